"""What makes a run resumable exactly and its checkpoints safe: RNG states in the checkpoint, atomic writes."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm.formats.safe_load import CheckpointError


class RNGStateCallback(L.Callback):
    """Saves the Python, NumPy, torch (CPU) and CUDA generator states of every rank in the checkpoint and puts
    them back on resume, so the noise, timesteps and caption dropout after a resume are the ones an
    uninterrupted run would have drawn."""

    def state_dict(self) -> dict[str, Any]:
        state = _rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
            return {"per_rank": states}
        return {"per_rank": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        states = state_dict["per_rank"]
        if rank < len(states):
            _set_rng_state(states[rank])


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: checkpoints must load with weights_only=True (no numpy objects inside)
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    """Checkpoints round-trip tuples as lists; the RNG setters want tuples back."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _no_space(error: BaseException) -> bool:
    """Is a full disk (or quota) behind this error? torch.save reports it as RuntimeError("[enforce fail at
    inline_container.cc] unexpected pos ...") with the OSError(ENOSPC) of the failed write as its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to .<name>.tmp, fsync, then os.replace: a kill during a save leaves the previous file intact
    (never a truncated checkpoint that a later `ckpt_path=last` would pick up). A failed save removes its
    partial .tmp; a full disk is reported as such, naming the file. Loads with weights_only=True."""

    @staticmethod
    def tmp_path(path: Path) -> Path:
        return path.with_name(f".{path.name}.tmp")

    @classmethod
    def remove_stale(cls, dirpath: str | Path) -> list[Path]:
        """Delete the partial .tmp files a killed save left in a checkpoint folder (at the start of a run)."""
        stale = sorted(Path(dirpath).glob(cls.tmp_path(Path("*.ckpt")).name)) if Path(dirpath).is_dir() else []
        for p in stale:  # a folder: a sharded checkpoint (trainer=fsdp2) whose save was killed
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        return stale

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if (checkpoint.get("ldm") or {}).get("refused"):
            return  # weights that diverged (LatentDiffusion.weights_verdict): the previous file stays
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_path(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if _no_space(e):
                raise OSError(errno.ENOSPC, f"no space left on device writing {path} (the previous checkpoints "
                                            "are intact: free some space, then resume with ckpt_path=last)") from e
            raise
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch's zip/unpickler errors do not name the file
            raise CheckpointError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from e
