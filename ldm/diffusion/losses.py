"""The training objective: the seed's Algorithm 1 (t ~ U{0..T-1}, eps ~ N(0, I), || target - net(x_t, t) ||^2),
with v-prediction, min-SNR-gamma weighting and offset noise as options."""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.masked_loss import apply_masked_loss
from ldm.diffusion.process import q_sample, training_target
from ldm.diffusion.schedules import NoiseSchedule


def sample_timesteps(batch: int, schedule: NoiseSchedule, device, generator: torch.Generator | None = None) -> Tensor:
    """t uniform over the T training steps (Algorithm 1, line 3)."""
    return torch.randint(0, schedule.num_train_timesteps, (batch,), device=device, generator=generator)


def sample_noise(x0: Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """eps ~ N(0, I), plus offset_noise * N(0, 1) per (sample, channel) when offset noise is on
    (Guttenberg 2023: lets the model learn to change an image's overall brightness)."""
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn(x0.shape[:2] + (1,) * (x0.ndim - 2), device=x0.device,
                                                   dtype=x0.dtype, generator=generator)
    return noise


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. (9)), per sample, for the schedule's prediction type:
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0."""
    snr = schedule.snr(t.cpu())
    clipped = snr.clamp(max=gamma)
    if schedule.prediction_type == "epsilon":
        w = clipped / snr.clamp(min=1e-12)
    elif schedule.prediction_type == "v_prediction":
        w = clipped / (snr + 1)
    else:
        w = clipped
    return w.to(device=t.device, dtype=torch.float32)


def diffusion_loss(
    model_output: Tensor, target: Tensor, schedule: NoiseSchedule, t: Tensor, min_snr_gamma: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean squared error per sample, optionally masked (``mask`` (B, 1, H, W) in [0, 1], see masked_loss) and
    min-SNR weighted, averaged over the batch (float32)."""
    per_element = (model_output.float() - target.float()).pow(2)
    if mask is not None:
        per_element = apply_masked_loss(per_element, mask)
    per_sample = per_element.flatten(1).mean(1)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(schedule, t, min_snr_gamma)
    return per_sample.mean()


def noised_batch(schedule: NoiseSchedule, x0: Tensor, offset_noise: float = 0.0,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1, lines 2-5: returns (x_t, t, target) for a clean batch x0."""
    t = sample_timesteps(x0.shape[0], schedule, x0.device, generator)
    noise = sample_noise(x0, offset_noise, generator)
    x_t = q_sample(schedule, x0, t, noise)
    return x_t, t, training_target(schedule, x0, noise, t)
