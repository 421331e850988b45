"""The first stage: train an AutoencoderKL (reconstruction + KL, optional PatchGAN) with the same train.py."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch import nn

from ldm.models.autoencoder_loss import AutoencoderLoss


class AutoencoderTraining(L.LightningModule):
    """Thin composition of an autoencoder and its loss. Manual optimisation: one optimizer for the autoencoder,
    and a second for the discriminator when the loss has one (taming-transformers / SD's VAE recipe)."""

    def __init__(self, autoencoder: nn.Module, loss: AutoencoderLoss, optimizer: Callable,
                 lr_scheduler: Callable | None = None, gradient_clip_val: float | None = 1.0):
        super().__init__()
        self.autoencoder, self.loss = autoencoder, loss
        self.gradient_clip_val = gradient_clip_val  # manual optimisation: the Trainer's own clipping is off
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.automatic_optimization = False

    @property
    def has_discriminator(self) -> bool:
        return getattr(self.loss, "discriminator", None) is not None

    def configure_optimizers(self):
        opts = [self.optimizer_factory(self.autoencoder.parameters())]
        if self.has_discriminator:
            opts.append(self.optimizer_factory(self.loss.discriminator.parameters()))
        if self.lr_scheduler_factory is None:
            return opts
        return opts, [{"scheduler": self.lr_scheduler_factory(o), "interval": "step"} for o in opts]

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        recon, posterior = self.autoencoder(x)
        loss, logs = self.loss.generator_loss(x, recon, posterior, self.global_step,
                                              last_layer=self.autoencoder.get_last_layer())
        opts[0].zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opts[0])
        opts[0].step()
        if self.has_discriminator:
            d_loss, d_logs = self.loss.discriminator_loss(x, recon.detach(), self.global_step)
            opts[1].zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opts[1].step()
            logs.update(d_logs)
        scheds = self.lr_schedulers()
        for s in scheds if isinstance(scheds, list) else ([scheds] if scheds is not None else []):
            s.step()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False)
        self.log("train/loss", loss.detach(), prog_bar=True)

    def _clip(self, optimizer) -> None:
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def validation_step(self, batch, batch_idx):
        x = batch["image"]
        recon, posterior = self.autoencoder(x, sample_posterior=False)
        self.log("val/rec_loss", (recon - x).abs().mean(), prog_bar=True, sync_dist=True)
        self.log("val/kl", posterior.kl().mean(), sync_dist=True)
