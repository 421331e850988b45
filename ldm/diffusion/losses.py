"""The training objective: the seed's Algorithm 1 (t ~ U{0..T-1}, eps ~ N(0, I), || target - net(x_t, t) ||^2),
with v-prediction, loss types (l2 / l1 / pseudo-Huber / smooth-L1), min-SNR-gamma and debiased-estimation
weighting, offset / pyramid noise, input perturbation and non-uniform timestep sampling as options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ldm.diffusion.masked_loss import apply_masked_loss
from ldm.diffusion.noise import sample_noise
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timestep_sampling import sample_timesteps

__all__ = ["LossOptions", "diffusion_loss", "min_snr_weight", "debiased_weight", "huber_c", "elementwise_loss",
           "huber_c_at", "weighted_loss", "sample_noise", "sample_timesteps"]

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
DEBIASED_SNR_MAX = 1000.0  # kohya-ss/sd-scripts custom_train_functions.apply_debiased_estimation clamps SNR here


@dataclass(frozen=True)
class LossOptions:
    """module.loss: the per-element loss and the debiased-estimation weighting (min-SNR is module.min_snr_gamma).

    huber_c is the pseudo-Huber threshold c of loss type huber / smooth_l1; huber_schedule makes it depend on t
    (see ``huber_c``)."""

    type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"  # kohya's default
    debiased_estimation: bool = False

    def __post_init__(self) -> None:
        if self.type not in LOSS_TYPES:
            raise ValueError(f"module.loss.type must be one of {LOSS_TYPES}, got {self.type!r}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ValueError(f"module.loss.huber_schedule must be one of {HUBER_SCHEDULES}, "
                             f"got {self.huber_schedule!r}")
        if not 0.0 < self.huber_c <= 1.0:
            raise ValueError(f"module.loss.huber_c must lie in (0, 1], got {self.huber_c}")


L2 = LossOptions()


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. (9)), per sample, for the schedule's prediction type:
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0."""
    snr = schedule.snr(t)
    clipped = snr.clamp(max=gamma)
    if schedule.prediction_type == "epsilon":
        w = clipped / snr.clamp(min=1e-12)
    elif schedule.prediction_type == "v_prediction":
        w = clipped / (snr + 1)
    else:
        w = clipped
    return w.to(device=t.device, dtype=torch.float32)


def debiased_weight(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Debiased-estimation weights (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training", eq. (13)):
    1 / sqrt(SNR_t) for eps-prediction and, as kohya's ``apply_debiased_estimation``, 1 / (SNR_t + 1) for
    v-prediction; SNR clamped at 1000 there too."""
    if schedule.prediction_type == "sample":
        raise ValueError("module.loss.debiased_estimation is defined for prediction_type epsilon or v_prediction, "
                         "not 'sample'")
    snr = schedule.snr(t).clamp(max=DEBIASED_SNR_MAX)
    w = 1 / (snr + 1) if schedule.prediction_type == "v_prediction" else 1 / snr.sqrt()
    return w.to(device=t.device, dtype=torch.float32)


def huber_c(options: LossOptions, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The pseudo-Huber threshold per sample (kohya train_util ``get_huber_threshold_if_needed``):
    constant: c; exponential: c^(t / T) (exp(-alpha t), alpha = -ln(c) / T: 1 at t = 0, c at t = T);
    snr: c_t = (1 - c) / (1 + sigma_t)^2 + c, sigma_t = sqrt((1 - abar_t) / abar_t)."""
    def noise_to_signal():
        abar = schedule.abar(t)
        return ((1 - abar) / abar).sqrt()

    return huber_c_at(options, t.double() / schedule.num_train_timesteps, noise_to_signal)


def huber_c_at(options: LossOptions, fraction: Tensor, noise_to_signal: Callable[[], Tensor]) -> Tensor:
    """``huber_c`` of any objective: ``fraction`` = t / T per sample, ``noise_to_signal()`` the sigma_t of the
    snr schedule (the noise's scale over the signal's: sqrt((1 - abar_t) / abar_t), or sigma / (1 - sigma) for
    flow matching)."""
    c = options.huber_c
    if options.huber_schedule == "constant":
        return torch.full(fraction.shape, c, dtype=torch.float32, device=fraction.device)
    if options.huber_schedule == "exponential":
        out = c ** fraction
    else:
        out = (1 - c) / (1 + noise_to_signal()) ** 2 + c
    return out.to(device=fraction.device, dtype=torch.float32)


def elementwise_loss(model_output: Tensor, target: Tensor, loss_type: str, c: Tensor | None = None) -> Tensor:
    """The loss of every element (float32), for kohya's loss types (train_util ``conditional_loss``):
    l2: d^2; l1: |d|; huber: 2c (sqrt(d^2 + c^2) - c) (pseudo-Huber, ~ d^2 near 0, ~ 2c|d| far out);
    smooth_l1: c (sqrt(d^2 + c^2) - c). c: one threshold per sample."""
    d = model_output.float() - target.float()
    if loss_type == "l2":
        return d.pow(2)
    if loss_type == "l1":
        return d.abs()
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"module.loss.type must be one of {LOSS_TYPES}, got {loss_type!r}")
    c = c.reshape(c.shape + (1,) * (d.ndim - 1)).to(d)
    # c (sqrt(d^2 + c^2) - c) written as c d^2 / (sqrt(d^2 + c^2) + c): the same value without the float32
    # cancellation of sqrt(d^2 + c^2) - c when |d| << c
    d2 = d.pow(2)
    pseudo = c * d2 / (torch.sqrt(d2 + c.pow(2)) + c)
    return 2 * pseudo if loss_type == "huber" else pseudo


def diffusion_loss(model_output: Tensor, target: Tensor, schedule: NoiseSchedule, t: Tensor,
                   min_snr_gamma: float | None = None, options: LossOptions | None = None,
                   mask: Tensor | None = None) -> Tensor:
    """Mean loss per sample (MSE by default), optionally masked (``mask`` (B, 1, H, W) in [0, 1], see
    masked_loss), min-SNR and debiased weighted, averaged over the batch (float32)."""
    options = options or L2
    c = huber_c(options, schedule, t) if options.type in ("huber", "smooth_l1") else None
    weights = []
    if min_snr_gamma is not None:
        weights.append(min_snr_weight(schedule, t, min_snr_gamma))
    if options.debiased_estimation:
        weights.append(debiased_weight(schedule, t))
    return weighted_loss(elementwise_loss(model_output, target, options.type, c), mask, weights)


def weighted_loss(per_element: Tensor, mask: Tensor | None, weights: list[Tensor]) -> Tensor:
    """Per-element losses -> the batch's loss: masked (see masked_loss), the mean per sample times each of the
    per-sample ``weights``, averaged over the batch."""
    if mask is not None:
        per_element = apply_masked_loss(per_element, mask)
    per_sample = per_element.flatten(1).mean(1)
    for w in weights:
        per_sample = per_sample * w
    return per_sample.mean()
