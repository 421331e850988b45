"""Paths that a file names, and paths we write into folders that came from elsewhere, kept inside their folder.

A file is bounded data: a name it holds (a diffusers weight index's shard, a latent-cache manifest's part, an image
folder's sidecar) is taken relative to the file's own folder, and must stay there once symlinks are followed. A
folder someone else made (a downloaded run folder) may ship a symlink where we write (``eval/<name>.json``,
``config.yaml``); we never write through one.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldm.formats.safe_load import CheckpointError


def inside(folder: str | Path, name: str, *, source: str, key: str) -> Path:
    """``folder / name``, refused (a CheckpointError naming ``source`` and ``key``) unless ``name`` is a relative
    path that stays inside ``folder`` once ``..`` and symlinks are resolved."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{source}: {key} = {name!r} must be a file name inside {folder}")
    if os.path.isabs(name) or name.startswith("~"):
        raise CheckpointError(f"{source}: {key} = {name!r} is an absolute path; a file may only name files in its "
                              "own folder")
    root = Path(folder).resolve()
    path = Path(folder) / name
    if not path.resolve().is_relative_to(root):
        raise CheckpointError(f"{source}: {key} = {name!r} points outside {folder} (through '..' or a symlink); "
                              "refused")
    return path


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path``, symlinks followed, lies inside ``folder`` (symlinks followed too)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def writable_inside(path: str | Path, folder: str | Path) -> Path:
    """``path`` (to be written) if neither it nor any folder between ``folder`` and it is a symlink, else an
    OSError naming it: a folder from elsewhere may ship a link where we write, and we never write through one."""
    path, folder = Path(path), Path(folder)
    try:
        parts = path.relative_to(folder).parts
    except ValueError:
        raise OSError(f"refusing to write {path}: it is not inside {folder}") from None
    current = folder
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise OSError(f"refusing to write {path}: {current} is a symbolic link (a folder from elsewhere may "
                          "point it anywhere); remove it and run again")
    return path
