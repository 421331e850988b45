"""Names written into files people share: exports, LoRA and embedding files, PNG text chunks, evaluation JSON,
latent-cache manifests. They never carry the user's home or an absolute path (a user name, a folder layout).

A path is written as

- a name relative to the written file's folder, when it lies inside that folder;
- itself, when it is a plain relative path already (``outputs/shapes/<time>/checkpoints/last.ckpt``, a hub id
  ``org/name``): nothing of the machine above the working folder;
- otherwise its file name only: ``/home/ana/models/v1-5.safetensors`` -> ``v1-5.safetensors``, and
  ``/home/ana/lora.safetensors:0.8`` (a spec with a scale) -> ``lora.safetensors:0.8``.

Free text that mentions paths (a skipped metric's reason) keeps its words; each absolute path in it becomes its
file name, after the home folder (which may hold spaces) is shortened to ``~``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

_WINDOWS_ABSOLUTE = re.compile(r"[A-Za-z]:[\\/]")
# An absolute (or ~) path inside text: it starts the text or follows a space, quote, '=', ':' + space or bracket,
# and runs to the next space, quote, comma or bracket. A URL's "//" is left alone (the ':' before it is no start).
_PATH_IN_TEXT = re.compile(r"(?<![^\s'\"=(\[{<])(?:~|file:|[A-Za-z]:)?[/\\][^\s'\"`,;()\[\]{}<>]+")


def is_machine_path(text: str) -> bool:
    """Whether ``text`` names a place on this machine from its root or home: ``/x``, ``~/x``, ``C:\\x``,
    ``file:/x``."""
    return text.startswith(("/", "\\", "~", "file:")) or _WINDOWS_ABSOLUTE.match(text) is not None


def file_name(text: str) -> str:
    """The last component of a path (posix or Windows), '' for a root."""
    text = text.removeprefix("file:")
    pure = PureWindowsPath(text) if _WINDOWS_ABSOLUTE.match(text) or "\\" in text else PurePosixPath(text)
    return pure.name


def shared_name(value: Any, folder: str | Path | None = None) -> str:
    """How ``value`` (a path, a hub id, a ``FILE:SCALE`` spec) is written into a file people share (module doc):
    relative to ``folder`` when inside it, as given when a plain relative path, else the file name."""
    text = str(value)
    if not text:
        return text
    if folder is not None and not text.startswith("file:"):
        try:
            inside = Path(text).expanduser().resolve().relative_to(Path(folder).expanduser().resolve())
            if inside.parts:  # the folder itself ("."): named by its file name below
                return inside.as_posix()
        except (ValueError, OSError, RuntimeError):
            pass
    if not is_machine_path(text) and ".." not in PurePosixPath(text.replace("\\", "/")).parts:
        return text
    return file_name(text)


def _home() -> str | None:
    home = os.path.expanduser("~")
    return home.rstrip("/\\") if len(home.rstrip("/\\")) > 1 else None  # HOME=/ : nothing to shorten


def shared_text(text: str) -> str:
    """``text`` with the home folder shortened to ``~`` and every absolute path in it reduced to its file name."""
    home = _home()
    if home is not None:
        text = text.replace(home, "~")
    return _PATH_IN_TEXT.sub(lambda m: file_name(m.group(0)), text)


def shared_config(node: Any, folder: str | Path | None = None) -> Any:
    """A copy of plain containers (dicts, lists) with every string made shareable: a whole path by
    :func:`shared_name`, any other text by :func:`shared_text`."""
    if isinstance(node, dict):
        return {k: shared_config(v, folder) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [shared_config(v, folder) for v in node]
    if isinstance(node, str):
        return shared_name(node, folder) if is_machine_path(node) else shared_text(node)
    return node
