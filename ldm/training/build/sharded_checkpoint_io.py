"""Writing and resuming trainer=fsdp2's sharded checkpoint folders (``ShardedDataParallel``): the folder put in
place whole, and each rank's shards read back into the sharded module. Reading such a folder outside training
(export, sampling) is ``ldm.formats.sharded_checkpoint``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn


def replace_folder(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path`` (a sharded checkpoint): the old one, if any, is moved aside first and
    deleted after, so that ``path`` is at every moment either the old or the new whole checkpoint, or absent with
    the old one at ``.<name>.old`` (a kill in between: ``ckpt_path`` an earlier step)."""
    old = path.with_name(f".{path.name}.old")
    if path.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    elif path.exists():
        path.unlink()
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizers: list, strict: bool) -> dict[str, Any]:
    """Resume from a sharded checkpoint folder: each rank reads its shards of the weights and optimizer state into
    the sharded module (torch.distributed.checkpoint); a part that saves only itself (an adapter run:
    ``strict_loading`` False) loads the keys the checkpoint holds and keeps the rest as built (the base from
    model.pretrained). Returns Lightning's checkpoint dict (``meta.pt``, read with weights_only=True) with the
    loaded ``state_dict`` entries, for ``on_load_checkpoint``'s checks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)

    stored = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    planner = DefaultLoadPlanner(allow_partial_load=not strict)
    state = {"state_dict": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=path, planner=planner)
    loaded = {k: v for k, v in state["state_dict"].items() if f"state_dict.{k}" in stored}
    model.load_state_dict(loaded, strict=strict)
    for i, optimizer in enumerate(optimizers):
        optim = {f"optimizer_{i}": get_optimizer_state_dict(model, optimizer)}
        dcp.load(optim, checkpoint_id=path, planner=planner)
        set_optimizer_state_dict(model, optimizer, optim[f"optimizer_{i}"], options=StateDictOptions(cpu_offload=True))
    checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = loaded
    return checkpoint
