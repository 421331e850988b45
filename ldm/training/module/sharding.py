"""FSDP2 (torch's ``fully_shard``) of a ``LatentDiffusion`` module, for ``trainer=fsdp2`` (Lightning's
``ModelParallelStrategy``, ``ldm.training.build.strategies.ShardedDataParallel``), which calls
``LatentDiffusion.configure_model`` once the processes are up and before the optimizer is built.

What is sharded over the data-parallel mesh:
- every block of the denoiser (``denoiser_blocks``: U-Net res/transformer blocks, MMDiT joint blocks) is its own
  FSDP unit, all-gathered just before it runs and freed after;
- the denoiser with the trained part's modules that act inside its forward (an adapter network and its EMA copy:
  forward hooks read their weights) form one more unit, the root: all-gathered when the denoiser's forward starts,
  its gradients reduce-scattered after the backward;
- a trained module with a forward of its own (a ControlNet, an EMA copy of the U-Net) is sharded the same way (its
  blocks, then itself), so each rank averages its own shards of an EMA.

The frozen autoencoder and text encoder stay whole on every rank. A forward of the sharded denoiser is a collective:
what rank 0 alone used to run (sample grids, the shapes task's prompt accuracy) runs on every rank in lockstep
(``ldm.training.callbacks.sampling.runs_the_model``), and the run's files are written from ``whole_weights``. A
text encoder that learns (``module.train_text_encoder``, ``adapter.text_encoder``, textual inversion) is refused: its
gradients would not be reduced over the ranks; so is any trained parameter left outside the units."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ldm.training.module.ema import EMA


def shard_module(module: nn.Module, mesh) -> None:
    """Shard ``module`` (a LatentDiffusion: ``unet`` and ``part``) over ``mesh``'s data-parallel dimension; nothing
    without a mesh (every strategy but ModelParallelStrategy) or when already sharded (``configure_model`` may run
    again, e.g. for ``trainer.validate`` after fit)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if mesh is None or isinstance(module.unet, FSDPModule):
        return
    from ldm.training.build.strategies import denoiser_blocks

    if module.part.text_encoder_learns:
        raise ValueError("trainer=fsdp2 shards the denoiser and its adapters, not the text encoder, which this run "
                         "trains (module.train_text_encoder, adapter.text_encoder or textual inversion): use "
                         "trainer=ddp, or train the denoiser only")
    dp, blocks = mesh["data_parallel"], tuple(denoiser_blocks())
    averaged = [m.model if isinstance(m, EMA) else m for m in module.part.modules().values()]
    own_units = [m for m in averaged if _runs_its_forward(m)]  # a ControlNet, an EMA copy of the U-Net
    in_denoiser = [m for m in averaged if not _runs_its_forward(m) and any(True for _ in m.parameters())]
    for tree in (module.unet, *own_units):
        for sub in tree.modules():
            if isinstance(sub, blocks):
                fully_shard(sub, mesh=dp)
    _shard_with(module.unet, in_denoiser, dp)
    for unit in own_units:  # sharded again after a forward (sampling), as the trained weights beside it are
        fully_shard(unit, mesh=dp, reshard_after_forward=True)
    _refuse_unsharded_training(module)


def _runs_its_forward(module: nn.Module) -> bool:
    """A module with a forward of its own is called (a ControlNet, an EMA copy of the U-Net sampled with): its own
    FSDP unit. One without (an adapter network, or its EMA copy: forward hooks on the U-Net's layers read its
    weights, ``LoRANetwork.weights_of``) joins the U-Net's unit, gathered whenever the U-Net runs."""
    return type(module).forward is not nn.Module.forward


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 shards some of ``module`` (trainer=fsdp2): its forward is then a collective of every rank."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _shard_with(root: nn.Module, beside: list[nn.Module], mesh) -> None:
    """``fully_shard(root)`` with the parameters of ``beside`` in its unit: FSDP2 groups a unit's parameters from
    ``root.parameters()`` when it is applied, and all-gathers them in ``root``'s forward (a grouped
    ``fully_shard([root, *beside])`` cannot be the root unit, which Lightning's loop needs: torch asks for one root
    module). The modules are registered under ``root`` for that call only: their parameters stay theirs (FSDP2 swaps
    sharded and whole tensors on the module that owns each), their state-dict keys unchanged."""
    from torch.distributed.fsdp import fully_shard

    root.add_module("_sharded_with_it", nn.ModuleList(beside))
    try:
        # resharded after every forward, a root too (FSDP2 keeps a root whole until the backward by default: after a
        # sampling forward, with no backward, it would stay whole beside its sharded EMA)
        fully_shard(root, mesh=mesh, reshard_after_forward=True)
    finally:
        del root._modules["_sharded_with_it"]


def _refuse_unsharded_training(module: nn.Module) -> None:
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in module.named_parameters()}
    outside = [names.get(id(p), "?") for p in module.part.parameters() if not isinstance(p, DTensor)]
    if outside:
        raise ValueError(f"trainer=fsdp2 shards the denoiser and its adapters, but {len(outside)} trained "
                         f"parameters lie outside them (e.g. {', '.join(outside[:3])}): train the text encoder "
                         "(module.train_text_encoder, adapter.text_encoder, textual inversion) with trainer=ddp")


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


@contextmanager
def whole_weights(module: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of ``module`` gathered whole for the length of the block (its parameters plain tensors, the
    same on every rank), then sharded again; nothing for a module that is not sharded. A collective: every rank
    enters it (e.g. before rank 0 alone writes the run's adapter file)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
