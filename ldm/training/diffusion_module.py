"""The LightningModule of latent diffusion: frozen VAE + frozen text encoder + trainable U-Net (the seed's
Algorithm 1 in latent space, with classifier-free conditioning dropout)."""

from __future__ import annotations

import logging
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn

from ldm.bundle import ModelBundle
from ldm.diffusion.losses import diffusion_loss, noised_batch
from ldm.diffusion.process import q_sample, training_target
from ldm.diffusion.schedules import NoiseSchedule
from ldm.training.divergence import DivergenceGuard
from ldm.training.ema import EMA

log = logging.getLogger("ldm.training")

VAL_TIMESTEP_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)


def freeze(module: nn.Module) -> nn.Module:
    """Frozen for real: no gradients, eval mode (dropout/BN off)."""
    return module.requires_grad_(False).eval()


class LatentDiffusion(L.LightningModule):
    def __init__(
        self,
        unet: nn.Module,
        autoencoder: nn.Module,
        text_encoder: nn.Module,
        schedule: NoiseSchedule,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        p_uncond: float = 0.1,
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        ema_decay: float | None = 0.9999,
        sample_posterior: bool = True,
        channels_last: bool = False,
        max_nonfinite_steps: int = 5,
        loss_spike_factor: float | None = 100.0,
        grad_norm_spike_factor: float | None = 100.0,
    ):
        super().__init__()
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.unet = unet
        self.autoencoder = freeze(autoencoder)
        self.text_encoder = freeze(text_encoder)
        self.schedule = schedule
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.p_uncond, self.min_snr_gamma, self.offset_noise = p_uncond, min_snr_gamma, offset_noise
        self.sample_posterior = sample_posterior
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.ema = EMA(unet, ema_decay) if ema_decay else None
        self.model_config: dict[str, Any] = {}  # the Hydra model node, saved with every checkpoint
        # skipped steps: NaN/inf, or a loss / gradient-norm spike; max_nonfinite_steps in a row stop the run
        self.guard = DivergenceGuard(loss_spike_factor, grad_norm_spike_factor, max_skipped_in_a_row=max_nonfinite_steps)
        self._step_losses: list[Tensor] = []  # the losses of the optimizer step being computed (accumulation)
        self._step_skipped = False
        self._last_batch: dict[str, Any] | None = None
        self._checked_step: tuple[int, str | None] | None = None  # (global step, verdict) of the weights to save

    @property
    def nonfinite_total(self) -> int:
        return self.guard.nonfinite_total

    # ----------------------------------------------------------------------------------------------- frozen parts
    def train(self, mode: bool = True):
        super().train(mode)
        freeze(self.autoencoder), freeze(self.text_encoder)  # Lightning's .train() must not wake them up
        return self

    @torch.no_grad()
    def encode_images(self, batch: dict[str, Any]) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w); a batch from the latent cache passes."""
        if "latents" in batch:
            return batch["latents"]
        return self.autoencoder.encode_latents(batch["image"], sample=self.sample_posterior)

    def drop_captions(self, captions: list[str]) -> tuple[list[str], Tensor]:
        """Classifier-free conditioning dropout: each caption becomes "" with probability p_uncond, so the model
        also learns the unconditional prediction, from the same empty-prompt context sampling uses."""
        drop = torch.rand(len(captions)) < self.p_uncond
        return ["" if d else c for c, d in zip(captions, drop.tolist())], drop

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Tensor:
        return self.text_encoder(list(captions))

    # -------------------------------------------------------------------------------------------------- training
    def forward(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.unet(x_t, t, context)

    def step_loss(self, batch: dict[str, Any]) -> Tensor:
        """Algorithm 1's loss on a batch (caption dropout, random timesteps and noise)."""
        latents = self.encode_images(batch)
        captions, _ = self.drop_captions(batch["caption"])
        context = self.encode_text(captions) if "context" not in batch else self._dropped_context(batch, captions)
        x_t, t, target = noised_batch(self.schedule, latents, self.offset_noise)
        return diffusion_loss(self(x_t, t, context), target, self.schedule, t, self.min_snr_gamma)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # always backpropagated, even when NaN: with DDP every rank must join the gradient all-reduce; whether the
        # update is applied is decided in on_before_optimizer_step, on values all ranks agree on
        loss = self.step_loss(batch)
        self._step_losses.append(loss.detach())
        self._last_batch = batch
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Apply the update or skip it: a NaN/inf or spiking loss or U-Net gradient norm (after unscaling, before
        clipping) clears the gradients, so the optimizer leaves the weights alone; the EMA and the logged
        loss then skip the step too (see DivergenceGuard). Logs train/loss and train/grad_norm of applied steps."""
        local = torch.stack(self._step_losses).mean() if self._step_losses else torch.tensor(float("nan"))
        self._step_losses = []
        loss = local
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            loss = loss.clone()  # the decision is on the mean loss over the ranks: every rank skips or none does
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        params = [p for p in self.unet.parameters() if p.grad is not None]
        grad_norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
                     if params else None)  # DDP has all-reduced the gradients already: the same on every rank
        loss_value = float(loss)
        grad_value = None if grad_norm is None else float(grad_norm)
        reason = self.guard.verdict(loss_value, grad_value)
        self._step_skipped = reason is not None
        if reason is None:
            self.guard.accept(loss_value, grad_value)
            self.log("train/loss", local, prog_bar=True, batch_size=len(self._last_batch["caption"]))
            if grad_norm is not None:
                self.log("train/grad_norm", grad_norm, batch_size=1)
            return
        for p in self.unet.parameters():
            p.grad = None
        self._forget_step_metrics("train/loss", "train/grad_norm")  # no stale value in this step's log row
        log.warning("step %d skipped: %s", self.global_step, reason)
        self.guard.skip(reason)
        self.log("train/nonfinite_steps", float(self.guard.nonfinite_total), batch_size=1)
        self.log("train/diverged_steps", float(self.guard.diverged_total), batch_size=1)
        self.guard.stop_if_persistent(reason)  # max_nonfinite_steps in a row

    def _dropped_context(self, batch: dict[str, Any], captions: list[str]) -> Tensor:
        """Cached text contexts: swap in the empty-prompt context where the caption was dropped."""
        context = batch["context"].clone()
        dropped = torch.tensor([c == "" for c in captions], device=context.device)
        if dropped.any():
            context[dropped] = self.text_encoder.empty_context(1).to(context)
        return context

    def optimizer_step(self, *args, **kwargs) -> None:
        """The step (closure: training_step + backward, then on_before_optimizer_step's verdict), then the EMA
        update, before any callback (checkpointing) sees the batch end; a skipped step leaves the EMA alone."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self._step_skipped:
            self.ema.update(self.unet)

    def _forget_step_metrics(self, *names: str) -> None:
        """Drop this epoch's cached values of these step metrics so that the logger writes none for this step
        (Lightning re-sends the last logged value of a metric at every step until the epoch ends)."""
        results = getattr(self.trainer, "_results", None)  # Lightning's _ResultCollection: no public API for this
        for metric in (results or {}).values():
            meta = getattr(metric, "meta", None)
            if meta is not None and meta.name in names:
                metric.reset()

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Deterministic validation loss: fixed timesteps and noise seeded by the batch index, no dropout, the
        posterior mean as latent, so the same weights always give the same number (for selection and sweeps)."""
        images = batch.get("image")
        latents = batch["latents"] if images is None else self.autoencoder.encode_latents(images, sample=False)
        context = self.encode_text(batch["caption"])
        g = torch.Generator(device="cpu").manual_seed(10_000 + batch_idx)
        T = self.schedule.num_train_timesteps
        losses = []
        for frac in VAL_TIMESTEP_FRACTIONS:
            t = torch.full((latents.shape[0],), int(frac * (T - 1)), device=latents.device, dtype=torch.long)
            noise = torch.randn(latents.shape, generator=g).to(latents)
            x_t = q_sample(self.schedule, latents, t, noise)
            target = training_target(self.schedule, latents, noise, t)
            losses.append(diffusion_loss(self.unet(x_t, t, context), target, self.schedule, t))
        return torch.stack(losses).mean()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.validation_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.unet.parameters())  # only the U-Net trains
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, p in self.unet.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(f"refusing to write a checkpoint with non-finite U-Net weights ({bad[:3]}...); "
                                     "the previous checkpoints are kept")
        checkpoint["ldm"] = {"model": self.model_config, "kind": "latent_diffusion", "guard": self.guard.state_dict()}
        reason = self.weights_verdict()
        if reason is not None:  # AtomicCheckpointIO writes nothing for it: the previous checkpoints stay the last
            log.warning("step %d: not writing a checkpoint, the weights diverged (%s)", self.global_step, reason)
            checkpoint["ldm"]["refused"] = reason

    @torch.no_grad()
    def weights_verdict(self) -> str | None:
        """Do the weights about to be saved still train? The last update's result was never evaluated, so the
        loss of the last batch is computed once more with them (its random draws from a forked generator state:
        the run's streams are untouched) and judged like a training step's (None: fine)."""
        if self._last_batch is None:
            return None
        if self._checked_step is not None and self._checked_step[0] == self.global_step:
            return self._checked_step[1]  # the step's other checkpoint (last.ckpt beside stepNNN.ckpt)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            loss = self.step_loss(self._last_batch).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)  # on_save_checkpoint runs on every rank
            loss /= torch.distributed.get_world_size()
        reason = self.guard.verdict(float(loss))
        self._checked_step = (self.global_step, reason)
        return reason

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict(checkpoint.get("ldm", {}).get("guard", {}))

    def bundle(self, use_ema: bool = True) -> ModelBundle:
        """The model as sampling sees it (EMA weights by default; a copy, so training is untouched)."""
        unet = self.ema.model if (use_ema and self.ema is not None) else self.unet
        return ModelBundle(unet, self.autoencoder, self.text_encoder, self.schedule, source="training",
                           meta={"global_step": self.global_step})
