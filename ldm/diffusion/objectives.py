"""The training objective as one object: what Algorithm 1 noises, what the network is given and learns, and the
loss of its prediction. The training module calls it and never asks which one it holds:

- :class:`DiffusionObjective`: a discrete variance-preserving ``NoiseSchedule`` with eps / v / x0 prediction
  (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, DDPM eq. (4); the target per ``prediction_type``);
- :class:`FlowObjective`: flow matching (``ldm.diffusion.flow``): x_t = (1 - sigma_t) x_0 + sigma_t eps, the
  velocity eps - x_0 as target, the network given sigma_t * T.

Both draw integer training timesteps t in 0..T-1 with the same samplers (``TimestepSampling``: uniform,
logit-normal, mode, cosmap), and the same noise options (offset, pyramid, input perturbation).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ldm.diffusion.flow import FlowMatching, flow_forward, flow_target
from ldm.diffusion.losses import LossOptions, L2, diffusion_loss, elementwise_loss, huber_c_at, weighted_loss
from ldm.diffusion.noise import NoiseOptions, perturbed_noise, pyramid_noise, sample_noise
from ldm.diffusion.process import q_sample, training_target
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timestep_sampling import TimestepSampling, sample_timesteps


class Objective(Protocol):
    """One training objective. ``t`` is always the integer training timestep (0..T-1)."""

    schedule: object  # the NoiseSchedule / FlowMatching it was made from (num_train_timesteps, prediction_type)

    def check(self, min_snr_gamma: float | None, options: LossOptions | None) -> None:
        """Raise ValueError naming the setting when a loss option does not apply to this objective."""
        ...

    def noisy(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The forward process: x_t from the clean x0, the noise and t."""
        ...

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network learns to output at (x0, eps, t)."""
        ...

    def model_timestep(self, t: Tensor, like: Tensor) -> Tensor:
        """What the network is given as its timestep (``like``: a batch of x_t, for resolution-dependent shifts)."""
        ...

    def loss(self, output: Tensor, target: Tensor, t: Tensor, min_snr_gamma: float | None = None,
             options: LossOptions | None = None, mask: Tensor | None = None) -> Tensor:
        """The batch's loss (float32)."""
        ...


class DiffusionObjective:
    """eps / v / x0 prediction on a discrete VP noise schedule (the seed's Algorithm 1)."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def check(self, min_snr_gamma: float | None, options: LossOptions | None) -> None:
        return None  # every loss option is defined for these (config_checks names the x0 + debiased case)

    def noisy(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return q_sample(self.schedule, x0, t, noise)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return training_target(self.schedule, x0, noise, t)

    def model_timestep(self, t: Tensor, like: Tensor) -> Tensor:
        return t

    def loss(self, output, target, t, min_snr_gamma=None, options=None, mask=None) -> Tensor:
        return diffusion_loss(output, target, self.schedule, t, min_snr_gamma, options, mask=mask)


class FlowObjective:
    """Rectified-flow velocity prediction (SD3): x_t = (1 - sigma) x0 + sigma eps, target eps - x0, SD3's loss
    weighting and min-SNR-gamma (``flow_min_snr_weight``); loss types l2 / l1 / (pseudo-)Huber as for the others, the Huber "snr" schedule with the noise-to-
    signal ratio sigma / (1 - sigma)."""

    def __init__(self, schedule: FlowMatching):
        self.schedule = schedule

    @staticmethod
    def check(min_snr_gamma: float | None, options: LossOptions | None) -> None:
        if options is not None and options.debiased_estimation:
            raise ValueError("module.loss.debiased_estimation is defined for eps / v prediction, not for flow "
                             "matching: set it to false and choose schedule.weighting instead")

    def _sigma(self, t: Tensor, like: Tensor) -> Tensor:
        seq = self.schedule.seq_len(like.shape) if self.schedule.dynamic_shift else None
        return self.schedule.sigma(t, seq)

    def noisy(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return flow_forward(x0, noise, self._sigma(t, x0))

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return flow_target(x0, noise)

    def model_timestep(self, t: Tensor, like: Tensor) -> Tensor:
        return self.schedule.model_timestep(self._sigma(t, like))

    def loss(self, output, target, t, min_snr_gamma=None, options=None, mask=None) -> Tensor:
        self.check(min_snr_gamma, options)
        options = options or L2
        sigma = self._sigma(t, output)
        c = None
        if options.type in ("huber", "smooth_l1"):
            c = huber_c_at(options, t.double() / self.schedule.num_train_timesteps, lambda: sigma / (1 - sigma))
        weights = [self.schedule.loss_weight(sigma)]
        if min_snr_gamma is not None:
            weights.append(flow_min_snr_weight(sigma, min_snr_gamma))
        per_element = elementwise_loss(output, target, options.type, c)
        return weighted_loss(per_element, mask, [w.to(output.device) for w in weights])


def flow_min_snr_weight(sigma: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023) for a velocity target. Their weight is min(SNR_t, gamma) on the x0 error;
    a target whose error is k times smaller than x0's takes min(SNR, gamma) k^2 (eps: k^2 = 1 / SNR, VP v:
    k^2 = 1 / (SNR + 1), their eq. (9)). Here x0-hat = x_t - sigma v-hat, so k = sigma, and with
    SNR = ((1 - sigma) / sigma)^2: w = min(SNR, gamma) sigma^2 = min((1 - sigma)^2, gamma sigma^2)."""
    return torch.minimum((1 - sigma) ** 2, gamma * sigma**2).to(torch.float32)


OBJECTIVES = {NoiseSchedule: DiffusionObjective, FlowMatching: FlowObjective}


def objective_for(schedule) -> Objective:
    """The objective of a schedule config (``schedule=scaled_linear`` ... : eps / v; ``schedule=flow``: flow)."""
    if hasattr(schedule, "noisy") and hasattr(schedule, "loss"):
        return schedule  # already an objective
    make = OBJECTIVES.get(type(schedule))
    if make is None:
        raise ValueError(f"schedule: no training objective for {type(schedule).__name__}; the schedule config must "
                         f"build one of {[c.__name__ for c in OBJECTIVES]}")
    return make(schedule)


def noised_batch(objective, x0: Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None,
                 timesteps: TimestepSampling | None = None,
                 noise_options: NoiseOptions | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1, lines 2-5: returns (x_t, t, target) for a clean batch x0 (t the integer training timestep;
    ``objective`` an Objective or a schedule). With input perturbation x_t is built from the perturbed noise, the
    target from eps."""
    objective = objective_for(objective)
    noise_options = noise_options or NoiseOptions()
    t = sample_timesteps(x0.shape[0], objective.schedule, x0.device, generator, timesteps)
    noise = sample_noise(x0, offset_noise, generator)
    noise = pyramid_noise(noise, noise_options.pyramid_iterations, noise_options.pyramid_discount, generator)
    x_t = objective.noisy(x0, t, perturbed_noise(noise, noise_options.ip_noise_gamma, generator))
    return x_t, t, objective.target(x0, noise, t)
