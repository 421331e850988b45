"""Apply an optimizer step or skip it: the decision between backward and the optimizer's update.

A NaN/inf or spiking loss or gradient norm (after unscaling, before clipping) clears the gradients, so the optimizer
leaves the weights alone; the EMA and the logged loss then skip the step too (``DivergenceGuard`` keeps the running
levels). Under DDP the decision is taken on the mean loss over the ranks and on the all-reduced gradients, so every
rank skips or none does. fp16 loss-scale overflows are left to the GradScaler.

Host syncs: the verdict needs the loss and gradient norm as Python numbers, once per optimizer step (this is the
step's one documented sync point)."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import Tensor, nn

from ldm.training.module.divergence import DivergenceGuard

log = logging.getLogger("ldm.training")


class GuardedUpdate:
    def __init__(self, guard: DivergenceGuard):
        self.guard = guard
        self.losses: list[Tensor] = []  # the losses of the optimizer step being computed (accumulation)
        self.skipped = False  # the verdict on the last step: no EMA update after a skipped one

    def add_loss(self, loss: Tensor) -> None:
        self.losses.append(loss.detach())

    def decide(self, module: L.LightningModule, params: list[nn.Parameter], batch_size: int) -> None:
        """Set ``skipped`` for this step; log train/loss and train/grad_norm of applied steps."""
        local = torch.stack(self.losses).mean() if self.losses else torch.tensor(float("nan"))
        self.losses = []
        loss = mean_over_ranks(local)
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                     if grads else None)  # DDP has all-reduced the gradients already: the same on every rank
        loss_value, grad_value = float(loss), None if grad_norm is None else float(grad_norm)
        if loss_scale_overflow(module, loss_value, grad_value):
            self.skipped = True  # GradScaler skips the update and lowers its scale: no EMA update, no log
            return
        reason = self.guard.verdict(loss_value, grad_value)
        self.skipped = reason is not None
        if reason is None:
            self.guard.accept(loss_value, grad_value)
            module.log("train/loss", local, prog_bar=True, batch_size=batch_size)
            if grad_norm is not None:
                module.log("train/grad_norm", grad_norm, batch_size=1)
            return
        for p in params:
            p.grad = None
        forget_step_metrics(module.trainer, "train/loss", "train/grad_norm")  # no stale value in this step's row
        log.warning("step %d skipped: %s", module.global_step, reason)
        self.guard.skip(reason)
        module.log("train/nonfinite_steps", float(self.guard.nonfinite_total), batch_size=1)
        module.log("train/diverged_steps", float(self.guard.diverged_total), batch_size=1)
        self.guard.stop_if_persistent(reason)  # max_nonfinite_steps in a row


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of ``value`` over the DDP ranks (itself without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    value = value.clone()
    torch.distributed.all_reduce(value)
    return value / torch.distributed.get_world_size()


def loss_scale_overflow(module: L.LightningModule, loss: float, grad_norm: float | None) -> bool:
    """fp16 loss scaling (16-mixed): a finite loss whose unscaled gradients are inf/NaN is the scaler's overflow,
    which GradScaler handles itself (skips the step, halves the scale), not a divergence of the weights."""
    trainer = module._trainer
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
    if scaler is None or grad_norm is None or math.isfinite(grad_norm) or not math.isfinite(loss):
        return False
    log.info("step %d: fp16 loss-scale overflow (scale %g), the scaler skips it", module.global_step,
             scaler.get_scale())
    return True


def forget_step_metrics(trainer: L.Trainer, *names: str) -> None:
    """Drop this epoch's cached values of these step metrics so that the logger writes none for this step
    (Lightning re-sends the last logged value of a metric at every step until the epoch ends)."""
    results = getattr(trainer, "_results", None)  # Lightning's _ResultCollection: no public API for this
    for metric in (results or {}).values():
        meta = getattr(metric, "meta", None)
        if meta is not None and meta.name in names:
            metric.reset()
