"""The LightningModule of latent diffusion: frozen VAE + frozen text encoder + trainable U-Net (the seed's
Algorithm 1 in latent space, with classifier-free conditioning dropout)."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn

from ldm.formats.bundle import ModelBundle
from ldm.diffusion.losses import diffusion_loss, noised_batch
from ldm.diffusion.process import q_sample, training_target
from ldm.diffusion.schedules import NoiseSchedule
from ldm.training.ema import EMA

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
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0

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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        latents = self.encode_images(batch)
        captions, _ = self.drop_captions(batch["caption"])
        context = self.encode_text(captions) if "context" not in batch else self._dropped_context(batch, captions)
        x_t, t, target = noised_batch(self.schedule, latents, self.offset_noise)
        loss = diffusion_loss(self(x_t, t, context), target, self.schedule, t, self.min_snr_gamma)
        if not self.loss_is_finite(loss):
            return None  # Lightning skips backward and the optimizer step
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def loss_is_finite(self, loss: Tensor) -> bool:
        """NaN/inf loss: skip the step and count it; stop with a clear message after max_nonfinite_steps in a
        row (the weights were never updated with it, so the last checkpoint is good)."""
        if bool(torch.isfinite(loss)):
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_total), batch_size=1)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"the loss was NaN/inf for {self.nonfinite_in_a_row} steps in a row (global step "
                f"{self.global_step}); stopping. The weights were not updated by those steps and the last "
                f"checkpoint is intact. Lower optim.lr, enable gradient clipping, or use precision=32 / bf16.")
        return False

    def _dropped_context(self, batch: dict[str, Any], captions: list[str]) -> Tensor:
        """Cached text contexts: swap in the empty-prompt context where the caption was dropped."""
        context = batch["context"].clone()
        dropped = torch.tensor([c == "" for c in captions], device=context.device)
        if dropped.any():
            context[dropped] = self.text_encoder.empty_context(1).to(context)
        return context

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the U-Net's total gradient norm (after unscaling, before clipping)."""
        grads = [p.grad for p in self.unet.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])),
                     batch_size=1)

    def on_before_zero_grad(self, optimizer) -> None:
        """Right after each optimizer step (before callbacks such as checkpointing see the batch end)."""
        if self.ema is not None:
            self.ema.update(self.unet)

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
        checkpoint["ldm"] = {"model": self.model_config, "kind": "latent_diffusion"}

    def bundle(self, use_ema: bool = True) -> ModelBundle:
        """The model as sampling sees it (EMA weights by default; a copy, so training is untouched)."""
        unet = self.ema.model if (use_ema and self.ema is not None) else self.unet
        return ModelBundle(unet, self.autoencoder, self.text_encoder, self.schedule, source="training",
                           meta={"global_step": self.global_step})
