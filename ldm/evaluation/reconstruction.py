"""How well a frozen first stage reproduces the training images: PSNR and mean colour shift of its round trip.

A VAE trained on other images (the shapes VAE on black-on-white glyphs, say) can decode the right forms in the
wrong colours; the diffusion model trained on its latents then inherits that, and nothing else would tell.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# Below these the round trip is "poor": 22 dB is a visibly blurred 32 px image; 8/255 a visible tint.
MIN_PSNR_DB = 22.0
MAX_COLOUR_SHIFT = 8.0


@dataclass
class ReconstructionReport:
    psnr_db: float  # 10 log10(1 / MSE) over all pixels, images in [0, 1]
    colour_shift: float  # mean over images of |mean RGB(reconstruction) - mean RGB(image)| (L2), in 0..255 units
    max_colour_shift: float  # the worst image's shift, same units
    n_images: int

    @property
    def poor(self) -> bool:
        return self.psnr_db < MIN_PSNR_DB or self.colour_shift > MAX_COLOUR_SHIFT

    def as_dict(self) -> dict:
        return {**asdict(self), "poor": self.poor}

    def __str__(self) -> str:
        return (f"PSNR {self.psnr_db:.1f} dB, mean colour shift {self.colour_shift:.1f}/255 "
                f"(worst {self.max_colour_shift:.1f}) over {self.n_images} images")


def compare(images: Tensor, reconstructions: Tensor) -> ReconstructionReport:
    """Report for (B, 3, H, W) images and their reconstructions, both in [-1, 1]."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    y = ((reconstructions.float() + 1) / 2).clamp(0, 1)
    mse = float(((x - y) ** 2).mean())
    psnr = 10 * math.log10(1.0 / max(mse, 1e-10))
    shift = (y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).norm(dim=1) * 255  # per image
    return ReconstructionReport(psnr, float(shift.mean()), float(shift.max()), len(images))


@torch.no_grad()
def round_trip(autoencoder, images: Tensor, batch_size: int = 32) -> Tensor:
    """decode(encode(x).mode()): the deterministic reconstruction (in [-1, 1]), through the latents the diffusion
    model sees (``encode_latents`` / ``decode_latents``: any first stage, the pixel-space identity included)."""
    param = next(autoencoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = []
    for s in range(0, len(images), batch_size):
        z = autoencoder.encode_latents(images[s:s + batch_size].to(device), sample=False)
        out.append(autoencoder.decode_latents(z).float().cpu())
    return torch.cat(out)


def check_autoencoder(autoencoder, images: Tensor) -> ReconstructionReport:
    return compare(images, round_trip(autoencoder, images))
