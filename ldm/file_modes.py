"""Files ldm writes get the mode ``open()`` / ``mkdir`` would give them: 0o666 (folders 0o777) minus the user's umask.

Some libraries create files private whatever the umask: ``safetensors.torch.save_file`` and ``tempfile.mkstemp``
make 0600 files. A ComfyUI or A1111 server running as another user could then not read the LoRA, embedding or
checkpoint a run wrote, under the usual umask 022. Every writer that goes through such a library calls
:func:`apply_umask` (or :func:`write_safetensors`) on what it wrote, before renaming it into place. The umask is
respected, never widened: a user with umask 077 keeps 0600 files.

A leaf module (no ldm imports), so every layer may use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux: ``Umask:`` in
    /proc/self/status); elsewhere by a round trip through the most restrictive mask, so a file another thread
    creates in between gets fewer rights, never more."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def default_mode(is_dir: bool = False) -> int:
    """What ``open(path, "w")`` (0o666) or ``mkdir`` (0o777) creates under the current umask."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def apply_umask(path: str | Path) -> Path:
    """Set ``path`` (a file, or a folder such as ``tempfile.mkdtemp``'s) to :func:`default_mode`. Links are left
    alone (their target is not ours to change)."""
    path = Path(path)
    if not path.is_symlink():
        os.chmod(path, default_mode(path.is_dir()))
    return path


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` (which creates 0600 files), then :func:`apply_umask`."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return apply_umask(path)
