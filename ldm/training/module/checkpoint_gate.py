"""What goes into a training checkpoint, and whether one is written at all.

Every checkpoint records the run's model config (so ``load_bundle`` can rebuild the networks as data, never code)
and the divergence guard's state; the trained part keeps what it needs to resume. Weights that are not finite, or
whose loss on the last batch has diverged, are not written: ``AtomicCheckpointIO`` then keeps the previous files."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ldm.training.module.divergence import DivergenceGuard
from ldm.training.module.guarded_update import mean_over_ranks
from ldm.training.module.host_sync import CHECKPOINT, host_sync_point

log = logging.getLogger("ldm.training")


class CheckpointGate:
    def __init__(self, guard: DivergenceGuard):
        self.guard = guard
        self._checked: tuple[int, str | None] | None = None  # (global step, verdict) of the weights to save

    def fill(self, checkpoint: dict[str, Any], *, model_config: dict, part, named: list[tuple[str, nn.Parameter]],
             global_step: int, last_loss: Callable[[], Tensor] | None) -> None:
        """Fill ``checkpoint`` (Lightning's dict) for the weights ``named`` of ``part``; mark it refused when the
        weights diverged. A host sync point: the guard's state comes from the device, and a run that has skipped
        max_nonfinite_steps steps in a row since the last logging step stops here, before writing."""
        with host_sync_point(CHECKPOINT):
            self.guard.sync()
            self.guard.stop_if_persistent(self.guard.last_reason)
            bad = non_finite(named)
            if bad:
                raise FloatingPointError(f"refusing to write a checkpoint with non-finite weights ({bad[:3]}...); "
                                         "the previous checkpoints are kept")
            checkpoint["ldm"] = {"model": model_config, "kind": "latent_diffusion", "guard": self.guard.state_dict()}
            part.checkpoint_entries(checkpoint)
            reason = self.verdict(global_step, last_loss)
        if reason is not None:  # AtomicCheckpointIO writes nothing for it: the previous checkpoints stay the last
            log.warning("step %d: not writing a checkpoint, the weights diverged (%s)", global_step, reason)
            checkpoint["ldm"]["refused"] = reason

    @torch.no_grad()
    def verdict(self, global_step: int, last_loss: Callable[[], Tensor] | None) -> str | None:
        """Do the weights about to be saved still train? The last update's result was never evaluated, so the loss
        of the last batch is computed once more with them (``last_loss``) and judged like a training step's
        (None: fine; no batch yet: fine)."""
        if last_loss is None:
            return None
        if self._checked is not None and self._checked[0] == global_step:
            return self._checked[1]  # the step's other checkpoint (last.ckpt beside stepNNN.ckpt)
        loss = mean_over_ranks(last_loss().float())  # on_save_checkpoint runs on every rank
        reason = self.guard.verdict(float(loss))
        self._checked = (global_step, reason)
        return reason


def non_finite(named: list[tuple[str, Tensor]]) -> list[str]:
    """The names of the tensors holding a NaN/inf (their checks read back together, once)."""
    if not named:
        return []
    finite = _finite_on_every_rank([p for _, p in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def _finite_on_every_rank(tensors: list[Tensor]) -> Tensor:
    """Whether each tensor is finite; for FSDP2's sharded tensors (DTensors, trainer=fsdp2) each rank checks its
    shards and the answers are joined over the ranks, so that every rank refuses the same checkpoint."""
    from torch.distributed.tensor import DTensor

    finite = torch.stack([torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all() for t in tensors])
    if any(isinstance(t, DTensor) for t in tensors):
        finite = finite.int()
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return finite.bool()
