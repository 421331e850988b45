"""Apply an optimizer step or skip it: the decision between backward and the optimizer's update.

A NaN/inf or spiking loss or gradient norm (after unscaling, before clipping) skips the update, so the optimizer
leaves the weights and its state alone; the EMA and the logged loss then skip the step too (``DivergenceGuard``
keeps the running levels). Under DDP the decision is taken on the mean loss over the ranks and on the all-reduced
gradients, so every rank skips or none does. fp16 loss-scale overflows are left to the GradScaler.

Host syncs (see ldm.training.module.host_sync): none in a step. The verdict is a bool on the device; a torch
optimizer with a fused kernel (optim=adamw's default ``fused: true``; also Adam, SGD, Adagrad) skips the update on
the device through the ``found_inf`` tensor its kernel takes from torch's GradScaler; the EMA update is weighted by
the verdict. The host learns the verdicts (the logged loss, ``train/nonfinite_steps``, the warning, the stop after
``module.max_nonfinite_steps`` skipped steps in a row) at the logging steps only (``trainer.log_every_n_steps``,
the last step of an epoch and of the run): a run that must stop does so there, its weights untouched since the
stop. Other optimizers (Adafactor, bitsandbytes' 8-bit AdamW) and fp16 loss scaling (the GradScaler reads its own
verdict on the host every step) cannot skip on the device: their verdict is read on the host every step
(``HOST_SKIP``) and the gradients of a skipped step are cleared."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch import Tensor, nn

from ldm.training.module.divergence import DivergenceGuard, Report
from ldm.training.module.host_sync import HOST_SKIP, REPORT, host_sync_point

log = logging.getLogger("ldm.training")

STEP_METRICS = ("train/loss", "train/grad_norm")


class GuardedUpdate:
    def __init__(self, guard: DivergenceGuard):
        self.guard = guard
        self.losses: list[Tensor] = []  # the losses of the optimizer step being computed (accumulation)
        self.applied: Tensor | None = None  # the verdict on this step (a device bool): weights the EMA update
        self._found_inf_on: torch.optim.Optimizer | None = None

    def add_loss(self, loss: Tensor) -> None:
        self.losses.append(loss.detach())

    def decide(self, module: L.LightningModule, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
               batch_size: int) -> None:
        """Judge this step on the device and make the optimizer skip it if it fails; report at logging steps."""
        device = params[0].device if params else None
        local = torch.stack(self.losses).mean() if self.losses else torch.full((), float("nan"), device=device)
        self.losses = []
        loss = mean_over_ranks(local)
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                     if grads else None)  # DDP has all-reduced the gradients already: the same on every rank
        grad_norm = whole(grad_norm)  # FSDP2 (trainer=fsdp2): each rank's shards' norm, joined over the ranks
        self.applied = self.guard.record(loss, grad_norm, loss_scale_overflow(module, loss, grad_norm),
                                         module.global_step)
        self._skip_unless_applied(module, optimizer, params)
        if is_report_step(module._trainer):
            self.report(module, local, grad_norm, batch_size)
        else:  # nothing logged this step: Lightning would otherwise convert the last logged values once more
            forget_step_metrics(module._trainer, *STEP_METRICS)

    def _skip_unless_applied(self, module: L.LightningModule, optimizer: torch.optim.Optimizer,
                             params: list[nn.Parameter]) -> None:
        if skips_on_device(module, optimizer):
            # torch's fused kernels skip the update (and undo their step count) where found_inf is 1, on the device
            optimizer.found_inf = (~self.applied).float()
            self._found_inf_on = optimizer
            return
        with host_sync_point(HOST_SKIP):
            applied = bool(self.applied)
        if not applied:
            for p in params:
                p.grad = None  # the optimizer leaves parameters without gradients alone

    def after_step(self) -> Tensor | None:
        """After the optimizer's step: the verdict for the EMA update (None: no verdict, applied)."""
        if self._found_inf_on is not None:
            del self._found_inf_on.found_inf
            self._found_inf_on = None
        applied, self.applied = self.applied, None
        return applied

    def report(self, module: L.LightningModule, local: Tensor, grad_norm: Tensor | None, batch_size: int) -> None:
        """The host sync point: log this step's loss if it was applied, count and name the skipped steps since the
        previous report, stop after max_nonfinite_steps skipped in a row."""
        with host_sync_point(REPORT):
            report = self.guard.report()
            scale = loss_scale(module) if report.overflows else None
        if report.applied:
            module.log("train/loss", local, prog_bar=True, batch_size=batch_size)
            if grad_norm is not None:
                module.log("train/grad_norm", grad_norm, batch_size=1)
        else:
            forget_step_metrics(module._trainer, *STEP_METRICS)  # no stale value in this step's row
        if report.overflows:
            log.info("%d fp16 loss-scale overflow(s) before step %d, skipped by the scaler (scale now %g)",
                     report.overflows, module.global_step + 1, scale)
        if report.skipped:
            self._log_skipped(module, report)
        self.guard.stop_if_persistent(report.reason)  # max_nonfinite_steps in a row

    def _log_skipped(self, module: L.LightningModule, report: Report) -> None:
        log.warning("%d step(s) skipped before step %d; the last, step %d: %s", report.skipped,
                    module.global_step + 1, report.last_skipped_step, report.reason)
        module.log("train/nonfinite_steps", float(self.guard.nonfinite_total), batch_size=1)
        module.log("train/diverged_steps", float(self.guard.diverged_total), batch_size=1)


def whole(value: Tensor | None) -> Tensor | None:
    """A value computed from sharded tensors (FSDP2's DTensors: a norm is a partial result on each rank) as the
    plain tensor of its global value, the same on every rank; other values as they are."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def is_report_step(trainer: L.Trainer | None) -> bool:
    """Lightning's logging steps (every trainer.log_every_n_steps, where Lightning reads its logged tensors too),
    the last batch of an epoch and the run's last step (so that the run ends with its counts and last loss)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or connector.should_update_logs:
        return True
    last_step = trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps
    return last_step or bool(trainer.is_last_batch)


def skips_on_device(module: L.LightningModule, optimizer: torch.optim.Optimizer) -> bool:
    """A torch optimizer whose fused kernel takes ``found_inf`` (GradScaler's protocol), with no GradScaler of
    its own to set it."""
    return (type(optimizer).__module__.startswith("torch.optim.") and getattr(optimizer, "_step_supports_amp_scaling",
                                                                              False) and _scaler(module) is None)


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of ``value`` over the DDP ranks (itself without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    value = value.clone()
    torch.distributed.all_reduce(value)
    return value / torch.distributed.get_world_size()


def _scaler(module: L.LightningModule):
    trainer = module._trainer
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None


def loss_scale(module: L.LightningModule) -> float:
    return float(_scaler(module).get_scale())


def loss_scale_overflow(module: L.LightningModule, loss: Tensor | float, grad_norm: Tensor | float | None):
    """fp16 loss scaling (16-mixed): a finite loss whose unscaled gradients are inf/NaN is the scaler's overflow,
    which GradScaler handles itself (skips the step, lowers the scale), not a divergence of the weights. A bool
    tensor (on the values' device), or False without a scaler."""
    if _scaler(module) is None or grad_norm is None:
        return False
    return torch.isfinite(torch.as_tensor(loss)) & ~torch.isfinite(torch.as_tensor(grad_norm))


def forget_step_metrics(trainer: L.Trainer | None, *names: str) -> None:
    """Drop this epoch's cached values of these step metrics so that the logger writes none for this step
    (Lightning re-sends the last logged value of a metric at every step until the epoch ends, and converts those
    shown in the progress bar to numbers at every step)."""
    results = getattr(trainer, "_results", None)  # Lightning's _ResultCollection: no public API for this
    for metric in (results or {}).values():
        meta = getattr(metric, "meta", None)
        if meta is not None and meta.name in names and not metric.has_reset:
            metric.reset()
