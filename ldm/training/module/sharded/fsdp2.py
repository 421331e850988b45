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

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from ldm.training.module.ema import EMA


def shard_module(module: nn.Module, mesh) -> None:
    """Shard ``module`` (a LatentDiffusion: ``unet`` and ``part``) over ``mesh``'s data-parallel dimension; nothing
    without a mesh (every strategy but ModelParallelStrategy) or when already sharded (``configure_model`` may run
    again, e.g. for ``trainer.validate`` after fit)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if mesh is None or isinstance(module.unet, FSDPModule):
        return
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


def unet_blocks() -> set[type]:
    """The U-Net's residual and transformer blocks: each its own FSDP unit (trainer=fsdp's auto-wrap policy too)."""
    from ldm.models.unet import BasicTransformerBlock, ResBlock

    return {ResBlock, BasicTransformerBlock}


def denoiser_blocks() -> set[type]:
    """The blocks trainer=fsdp2 shards each on its own: the U-Net's, the MMDiT's joint blocks (Flux's double-stream
    blocks too) and Flux's single-stream blocks."""
    from ldm.models.flux import SingleStreamBlock
    from ldm.models.mmdit import JointBlock

    return unet_blocks() | {JointBlock, SingleStreamBlock}


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
        raise ValueError(f"trainer=fsdp2 shards the denoiser, its adapter and ControlNet, but {len(outside)} trained "
                         f"parameters lie outside them (e.g. {', '.join(outside[:3])}) and would not be reduced over "
                         "the ranks: train this with trainer=ddp")


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
