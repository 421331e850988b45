"""The forward process q(x_t | x0) and the conversions between the network's prediction targets.

Notation (variance-preserving form): a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t), so x_t = a_t x0 + s_t eps.
The v target is v = a_t eps - s_t x0 (Salimans & Ho 2022, sec. 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule


def _bcast(coef: Tensor, like: Tensor) -> Tensor:
    """(B,) or scalar coefficient -> broadcastable against a (B, ...) tensor, in its dtype/device."""
    coef = coef.to(device=like.device, dtype=like.dtype)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def signal_noise(schedule: NoiseSchedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """(a_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t)) in float64, for integer timesteps t."""
    abar = schedule.abar(t)
    return abar.sqrt(), (1 - abar).sqrt()


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Forward process in one step: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. (4), reparameterised)."""
    a, s = signal_noise(schedule, t)
    return _bcast(a, x0) * x0 + _bcast(s, x0) * noise


def training_target(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the network is trained to predict at (x0, eps, t) for the schedule's prediction_type."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "sample":
        return x0
    a, s = signal_noise(schedule, t)
    return _bcast(a, x0) * noise - _bcast(s, x0) * x0  # v = a_t eps - s_t x0


def x0_eps_from_output(output: Tensor, x_t: Tensor, a: Tensor, s: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """Turn a network output into (x0-hat, eps-hat) given x_t = a x0 + s eps.

    a and s are scalars or (B,) tensors. For epsilon: x0 = (x_t - s eps) / a (DDPM eq. (15)).
    For v: x0 = a x_t - s v and eps = s x_t + a v (since a^2 + s^2 = 1).
    """
    a, s = _bcast(torch.as_tensor(a), x_t), _bcast(torch.as_tensor(s), x_t)
    if prediction_type == "epsilon":
        eps = output
        x0 = (x_t - s * eps) / a  # eq. (15)
    elif prediction_type == "v_prediction":
        x0 = a * x_t - s * output
        eps = s * x_t + a * output
    elif prediction_type == "sample":
        x0 = output
        eps = (x_t - a * x0) / s
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def output_from_x0_eps(x0: Tensor, eps: Tensor, a: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    """Inverse of :func:`x0_eps_from_output`: the output a network of this prediction type should give."""
    a, s = _bcast(torch.as_tensor(a), x0), _bcast(torch.as_tensor(s), x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
