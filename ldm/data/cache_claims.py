"""Claim files: several processes (DDP ranks, or independent runs) share the work of one cache folder.

A claim is a small file created with ``O_CREAT | O_EXCL`` (atomic on a local file system and on NFS v3+): exactly
one process succeeds, the others see it exists and take other work. It holds who made it (host, pid, a random
token); its mtime is the holder's heartbeat (`Claim.beat`, touched while it works).

A claim is *stale* when its holder cannot finish it: the same host and the pid no longer runs (a killed rank), or
its heartbeat is older than `stale_seconds` (a holder on another host that died, or hangs). A stale claim is
broken only while holding the folder's planning lock (`folder_lock`), so two processes never both break it and
then both take the work.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

HOST = socket.gethostname()
STALE_SECONDS = 1800.0  # a claim whose holder has not beaten its heartbeat for this long is taken over
BEAT_SECONDS = 10.0  # the holder touches its claim at most this often
LOCK = "plan.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def is_stale(path: Path, stale_seconds: float = STALE_SECONDS) -> bool:
    """True when the claim at `path` was made by a process that can no longer finish its work."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: not stale, simply gone
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return age > 5.0  # a claim still being written, or garbage a crash left behind
    if not isinstance(holder, dict):
        return True
    if holder.get("host") == HOST and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
        return True
    return age > stale_seconds


class Claim:
    """A claim held by this process; `beat` keeps it fresh, `release` removes it."""

    def __init__(self, path: Path):
        self.path, self.last = path, time.monotonic()

    def beat(self) -> None:
        if time.monotonic() - self.last >= BEAT_SECONDS:
            self.last = time.monotonic()
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def try_claim(path: Path) -> Claim | None:
    """Create the claim file `path` atomically; None when another process holds it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"host": HOST, "pid": os.getpid(), "token": uuid.uuid4().hex, "time": time.time()}, f)
    return Claim(path)


def break_if_stale(path: Path, stale_seconds: float = STALE_SECONDS) -> bool:
    """Remove a stale claim (call only while holding `folder_lock`); True when it was removed."""
    if not is_stale(path, stale_seconds):
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return True


@contextmanager
def folder_lock(folder: Path, timeout: float, stale_seconds: float = STALE_SECONDS, poll: float = 0.05):
    """The folder's planning lock: held briefly, while one process reads the folder and plans or hands out work."""
    path = folder / LOCK
    deadline = time.monotonic() + timeout
    while (claim := try_claim(path)) is None:
        if is_stale(path, stale_seconds):  # its holder died while planning: the plan it wrote is whole or absent
            break_if_stale(path, stale_seconds)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"latent cache {folder}: {LOCK} has been held for {timeout:.0f} s by another process "
                               f"({path.read_text(errors='replace')[:200]}); delete it if no run uses this folder")
        time.sleep(poll)
    try:
        yield
    finally:
        claim.release()
