"""Which training timesteps t a batch draws (Algorithm 1, line 3, and its non-uniform variants).

- ``uniform`` (the default): t ~ U{min_timestep, ..., max_timestep - 1}, as kohya-ss/sd-scripts
  library/train_util.py ``get_timesteps`` (torch.randint(min, max)).
- ``logit_normal``: u = sigmoid(n), n ~ N(logit_mean, logit_std^2) (Esser et al. 2024, SD3, eq. (19)).
- ``mode``: u = f_mode(v; s) = 1 - v - s (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1) (SD3, eq. (20)); s = mode_scale,
  monotone only for s in [-1, 2 / (pi - 2)].
- ``cosmap``: u = 1 - 1 / (tan(pi v / 2) + 1), v ~ U(0, 1) (SD3, eq. (21)).

The non-uniform kinds draw a noise level u in [0, 1) (0: clean, 1: pure noise, the paper's convention, as
diffusers training_utils.compute_density_for_timestep_sampling draws it) and map it onto the allowed range:
t = min_timestep + floor(u (max_timestep - min_timestep)). A larger logit_mean therefore means noisier steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap")
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


@dataclass(frozen=True)
class TimestepSampling:
    """module.timesteps: how t is drawn; max_timestep is exclusive (null: the schedule's T)."""

    kind: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # SD3's choice (sec. 5.1)
    min_timestep: int = 0
    max_timestep: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"module.timesteps.kind must be one of {TIMESTEP_SAMPLINGS}, got {self.kind!r}")
        if not self.logit_std > 0:
            raise ValueError(f"module.timesteps.logit_std must be > 0, got {self.logit_std}")
        lo, hi = MODE_SCALE_RANGE
        if not lo <= self.mode_scale <= hi:
            raise ValueError(f"module.timesteps.mode_scale must lie in [{lo}, {hi:.4f}] (outside it f_mode is not "
                             f"monotone, SD3 eq. (20)), got {self.mode_scale}")
        if self.min_timestep < 0:
            raise ValueError(f"module.timesteps.min_timestep must be >= 0, got {self.min_timestep}")
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(f"module.timesteps.max_timestep ({self.max_timestep}) must be greater than "
                             f"min_timestep ({self.min_timestep}); it is exclusive")

    def bounds(self, schedule: NoiseSchedule) -> tuple[int, int]:
        """[min, max) of the drawn timesteps for this schedule."""
        T = schedule.num_train_timesteps
        hi = T if self.max_timestep is None else self.max_timestep
        if hi > T:
            raise ValueError(f"module.timesteps.max_timestep={hi} exceeds the schedule's {T} training steps")
        return self.min_timestep, hi

    def noise_level(self, batch: int, device, generator: torch.Generator | None = None) -> Tensor:
        """u in [0, 1) for the non-uniform kinds (float64 on the CPU, so the draws do not depend on the device)."""
        if self.kind == "logit_normal":
            n = torch.randn(batch, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(self.logit_mean + self.logit_std * n)
        else:
            v = torch.rand(batch, generator=generator, dtype=torch.float64)
            if self.kind == "mode":
                u = 1 - v - self.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
            else:  # cosmap
                u = 1 - 1 / (torch.tan(math.pi * v / 2) + 1)
        return u.clamp(0.0, 1.0)


UNIFORM = TimestepSampling()


def sample_timesteps(batch: int, schedule: NoiseSchedule, device, generator: torch.Generator | None = None,
                     sampling: TimestepSampling | None = None) -> Tensor:
    """t for each sample of a batch (long, on ``device``); the default is Algorithm 1's t ~ U{0..T-1}."""
    sampling = sampling or UNIFORM
    lo, hi = sampling.bounds(schedule)
    if sampling.kind == "uniform":
        return torch.randint(lo, hi, (batch,), device=device, generator=generator)
    u = sampling.noise_level(batch, device, generator)
    t = lo + torch.floor(u * (hi - lo)).long()
    return t.clamp(max=hi - 1).to(device)
