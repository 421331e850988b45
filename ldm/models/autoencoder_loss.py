"""Training loss for the first stage (``AutoencoderKL``).

Follows the taming-transformers / Stable Diffusion ``LPIPSWithDiscriminator``:
per-sample summed reconstruction (+ optional perceptual) loss, ``kl_weight`` times
the posterior KL, and an optional PatchGAN with hinge loss that switches on at
``disc_start`` with the adaptive weight computed on the decoder's last layer.
The learned output log-variance of the original is fixed at 0 (it is not in the
original's optimizer either), so the NLL term is the plain reconstruction sum.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder import DiagonalGaussian

__all__ = ["AutoencoderLoss", "NLayerDiscriminator", "hinge_d_loss"]


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming layout: ``main.{i}``).

    Image ``(B, C, H, W)`` -> patch logits ``(B, 1, H', W')``.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, num_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**num_layers, 8)
        layers += [
            nn.Conv2d(channels * prev, channels * mult, 4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(channels * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Init as in taming ``weights_init``: conv N(0, 0.02), BN weight N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """Reconstruction + KL (+ perceptual) (+ PatchGAN) loss for a VAE.

    Args:
        rec_loss: ``"l1"`` or ``"l2"`` per-pixel reconstruction loss.
        kl_weight: weight of the per-sample KL (SD uses 1e-6).
        perceptual: optional callable ``perceptual(x, recon) -> (B,)``, e.g. LPIPS.
        perceptual_weight: weight of the perceptual term (added per pixel, as in SD).
        use_discriminator: enable the PatchGAN branch.
        disc_start: global step at which the GAN terms switch on.
        disc_weight: scale of the adaptive GAN weight.
        disc_factor: multiplier of the GAN terms once active.
        disc_in_channels, disc_channels, disc_num_layers: discriminator shape.
    """

    def __init__(
        self,
        rec_loss: str = "l1",
        kl_weight: float = 1e-6,
        perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        perceptual_weight: float = 1.0,
        use_discriminator: bool = False,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_in_channels: int = 3,
        disc_channels: int = 64,
        disc_num_layers: int = 3,
    ):
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        self.rec_loss = rec_loss
        self.kl_weight = kl_weight
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        if use_discriminator:
            self.discriminator = NLayerDiscriminator(
                disc_in_channels, disc_channels, disc_num_layers
            )
        else:
            self.discriminator = None

    def gan_factor(self, global_step: int) -> float:
        """``disc_factor`` once ``global_step >= disc_start``, else 0."""
        if self.discriminator is None or global_step < self.disc_start:
            return 0.0
        return self.disc_factor

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """Balance GAN vs. reconstruction gradients at ``last_layer``."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.disc_weight

    def reconstruction(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-sample summed reconstruction (+ perceptual) loss: (B,)."""
        if self.rec_loss == "l1":
            per_pixel = (x - recon).abs()  # (B, C, H, W)
        else:
            per_pixel = (x - recon).pow(2)
        rec = per_pixel.flatten(1).sum(dim=1)  # (B,)
        if self.perceptual is not None and self.perceptual_weight > 0:
            p = self.perceptual(x, recon).reshape(x.shape[0])  # (B,)
            # SD adds the (B,1,1,1) LPIPS value to every pixel before summing.
            rec = rec + self.perceptual_weight * p * per_pixel[0].numel()
        return rec

    def generator_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        posterior: DiagonalGaussian,
        global_step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for the autoencoder's optimizer, and detached logs."""
        rec = self.reconstruction(x, recon)  # (B,)
        nll_loss = rec.mean()
        kl_loss = posterior.kl().mean()
        loss = nll_loss + self.kl_weight * kl_loss

        zero = torch.zeros((), device=x.device)
        g_loss, d_weight = zero, zero
        factor = self.gan_factor(global_step)
        if factor > 0:
            g_loss = -self.discriminator(recon).mean()
            if last_layer is None:
                d_weight = torch.tensor(self.disc_weight, device=x.device)
            else:
                try:
                    d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
                except RuntimeError:  # no graph (evaluation): skip the GAN term
                    d_weight = zero
            loss = loss + d_weight * factor * g_loss

        logs = {
            "total_loss": loss.detach(),
            "rec_loss": (rec.mean() / x[0].numel()).detach(),  # per-pixel mean
            "nll_loss": nll_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "g_loss": g_loss.detach(),
            "d_weight": d_weight.detach(),
            "disc_factor": torch.tensor(factor, device=x.device),
        }
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, global_step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss for the discriminator's optimizer (inputs are detached)."""
        if self.discriminator is None:
            raise RuntimeError("AutoencoderLoss was built with use_discriminator=False")
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(recon.detach())
        factor = self.gan_factor(global_step)
        loss = factor * hinge_d_loss(logits_real, logits_fake)
        logs = {
            "disc_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs
