"""What makes a run resumable exactly and its checkpoints safe: RNG states in the checkpoint, atomic writes."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm.checkpoints.safe_load import CheckpointError


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to <path>.tmp, fsync, then os.replace: a kill during a save leaves the previous file intact
    (never a truncated checkpoint that a later `ckpt_path=last` would pick up). Loads with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch's zip/unpickler errors do not name the file
            raise CheckpointError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from e
