"""The noise eps of the training objective and its variants.

- plain eps ~ N(0, I) (Algorithm 1, line 4);
- offset noise (Guttenberg 2023): + offset * N(0, 1) per (sample, channel), so the model can learn to change an
  image's overall brightness;
- multi-resolution ("pyramid") noise (Whitaker 2023, as kohya-ss/sd-scripts library/custom_train_functions.py
  ``pyramid_noise_like``): noise upsampled from ever coarser grids, weighted discount^i, added to eps, the sum
  rescaled to unit standard deviation;
- input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models", eq. (9);
  kohya's ``ip_noise_gamma``): x_t is built from eps + gamma * xi while the target stays eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class NoiseOptions:
    """module.noise: multires/pyramid noise (pyramid_iterations = 0: off) and input perturbation (0: off)."""

    pyramid_iterations: int = 0
    pyramid_discount: float = 0.3  # kohya's multires_noise_discount default
    ip_noise_gamma: float = 0.0  # Ning et al. use 0.1

    def __post_init__(self) -> None:
        if self.pyramid_iterations < 0:
            raise ValueError(f"module.noise.pyramid_iterations must be >= 0, got {self.pyramid_iterations}")
        if not 0.0 <= self.pyramid_discount <= 1.0:
            raise ValueError(f"module.noise.pyramid_discount must lie in [0, 1], got {self.pyramid_discount}")
        if self.ip_noise_gamma < 0:
            raise ValueError(f"module.noise.ip_noise_gamma must be >= 0, got {self.ip_noise_gamma}")


def sample_noise(x0: Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """eps ~ N(0, I), plus offset_noise * N(0, 1) per (sample, channel) when offset noise is on."""
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn(x0.shape[:2] + (1,) * (x0.ndim - 2), device=x0.device,
                                                   dtype=x0.dtype, generator=generator)
    return noise


def pyramid_noise(noise: Tensor, iterations: int, discount: float, generator: torch.Generator | None = None) -> Tensor:
    """noise + sum_i discount^i * up(N(0, I) on an (h_i, w_i) grid), divided by the std of the sum.

    Level i shrinks the previous grid by a random factor r_i^i, r_i ~ U(2, 4), and the loop stops once a side
    reaches 1 (kohya's ``pyramid_noise_like``; level 0 has the full size). Bilinear upsampling, as there."""
    if iterations == 0:
        return noise
    b, c, h, w = noise.shape
    out = noise.float().clone()
    for i in range(iterations):
        r = 2 + 2 * _host_uniform(generator)
        h, w = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((b, c, h, w), generator=generator, device=noise.device)
        out += F.interpolate(level, size=noise.shape[2:], mode="bilinear", align_corners=False) * discount**i
        if h == 1 or w == 1:
            break
    return (out / out.std()).to(noise.dtype)


def _host_uniform(generator: torch.Generator | None) -> float:
    """u ~ U(0, 1) as a Python number: the grid size depends on it, so it is drawn on the host (a draw on the GPU
    read back would stall the training step), from ``generator`` when it is a CPU one."""
    if generator is not None and generator.device.type != "cpu":
        return float(torch.rand((), generator=generator, device=generator.device))  # its own stream, read back
    return float(torch.rand((), generator=generator))


def perturbed_noise(noise: Tensor, ip_noise_gamma: float, generator: torch.Generator | None = None) -> Tensor:
    """The noise that builds x_t under input perturbation: eps + gamma * xi, xi ~ N(0, I) (the target stays eps)."""
    if ip_noise_gamma == 0:
        return noise
    xi = torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
    return noise + ip_noise_gamma * xi
