"""Differentiable scorers for classifier guidance (seed, "Classifier Guidance": the gradient of a classifier's
output steers each denoising step). A scorer maps the predicted clean latents x0-hat (B, C, h, w) and the
timesteps (B,) to a log-preference (B,); ``ClassifierGuidance(scorer, scale)`` turns its gradient into an eps
correction. Use them through the pipelines' ``classifier_guidance=`` argument.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class ColorScorer:
    """Prefers images whose mean colour is ``target_rgb`` (each in [0, 1]).

    log p(y | x0) = -weight * N * || mean_pixels(decode(x0)) - target ||^2 with the image in [-1, 1] and N its
    pixel count, so the push on each pixel does not shrink with the resolution. The gradient flows through the VAE
    decoder (and, in ClassifierGuidance, through the U-Net's x0 prediction).
    """

    def __init__(self, autoencoder: nn.Module, target_rgb: Sequence[float], weight: float = 1.0):
        target = torch.as_tensor(target_rgb, dtype=torch.float32)
        if target.shape != (3,) or bool(((target < 0) | (target > 1)).any()):
            raise ValueError(f"target_rgb must be 3 values in [0, 1], got {list(target_rgb)}")
        self.autoencoder, self.weight = autoencoder, float(weight)
        self.target = target * 2 - 1  # [0, 1] -> the decoder's [-1, 1]

    def __call__(self, x0: Tensor, t: Tensor) -> Tensor:
        p = next(self.autoencoder.parameters(), None)
        z = x0 if p is None else x0.to(p.dtype)
        image = self.autoencoder.decode_latents(z).float()  # (B, 3, H, W)
        mean = image.mean(dim=(2, 3))  # (B, 3)
        n = image.shape[2] * image.shape[3]
        return -self.weight * n * (mean - self.target.to(mean.device)).pow(2).sum(dim=1)  # (B,)

    def distance(self, images: Tensor) -> Tensor:
        """Per-image distance of the mean colour of decoded images (B, 3, H, W) in [-1, 1] to the target."""
        mean = images.float().mean(dim=(2, 3))
        return (mean - self.target.to(mean.device)).pow(2).sum(dim=1).sqrt()
