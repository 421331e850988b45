"""Noise schedules: beta_t, alpha_t = 1 - beta_t and alpha-bar_t = prod_{s<=t} alpha_s (DDPM, Ho et al. 2020).

Everything is computed in float64 and kept there; samplers cast coefficients to the sample's dtype at use.
Timesteps are 0-based: t = 0 .. T-1 index the T training steps (the seed's 1..T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Defaults of each schedule: (beta_start, beta_end).
_DEFAULT_RANGE = {
    "linear": (1e-4, 0.02),  # DDPM
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion
    "cosine": (None, None),
}


def linear_betas(T: int, beta_start: float, beta_end: float) -> Tensor:
    """DDPM's schedule: beta_t linear from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> Tensor:
    """Stable Diffusion's schedule: sqrt(beta_t) linear from sqrt(beta_start) to sqrt(beta_end)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. (17): abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2);
    beta_t = 1 - abar(t+1)/abar(t), clipped at max_beta."""

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def zero_terminal_snr_betas(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that sqrt(abar_0) is kept and sqrt(abar_T) = 0."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass
class NoiseSchedule:
    """The discrete diffusion process of a model: its betas and what its network predicts.

    Build with ``NoiseSchedule.make("scaled_linear")``; Hydra configs call ``make`` through ``_target_``.
    """

    betas: Tensor  # (T,) float64
    prediction_type: str = "epsilon"
    kind: str = "custom"  # the schedule name it was made from (for export / scheduler configs)
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False
    alphas_cumprod: Tensor = field(init=False, repr=False)
    # (1, abar_0, ..., abar_{T-1}) per device, copied there once: a training step indexes it with timesteps drawn
    # on the device and never reads them back to the host
    _abar_tables: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.betas = torch.as_tensor(self.betas, dtype=torch.float64)
        if self.betas.ndim != 1 or len(self.betas) < 2:
            raise ValueError("betas must be a 1-D tensor with at least 2 entries")
        if not bool(((self.betas > 0) & (self.betas <= 1)).all()):
            raise ValueError("every beta_t must lie in (0, 1]")
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)  # abar_t
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "rescale_zero_terminal_snr needs prediction_type 'v_prediction' (or 'sample'): at abar_T = 0 an "
                "epsilon model carries no information about x0 (Lin et al. 2023, sec. 3.2)"
            )

    @classmethod
    def make(
        cls,
        kind: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        rescale_zero_terminal_snr: bool = False,
        prediction_type: str = "epsilon",
    ) -> "NoiseSchedule":
        if kind not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        default_start, default_end = _DEFAULT_RANGE[kind]
        beta_start = default_start if beta_start is None else beta_start
        beta_end = default_end if beta_end is None else beta_end
        T = num_train_timesteps
        if kind == "linear":
            betas = linear_betas(T, beta_start, beta_end)
        elif kind == "scaled_linear":
            betas = scaled_linear_betas(T, beta_start, beta_end)
        else:
            betas = cosine_betas(T)
        if rescale_zero_terminal_snr:
            betas = zero_terminal_snr_betas(betas)
        return cls(
            betas,
            prediction_type=prediction_type,
            kind=kind,
            beta_start=beta_start,
            beta_end=beta_end,
            zero_terminal_snr=rescale_zero_terminal_snr,
        )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> Tensor:
        return 1 - self.betas

    def abar(self, t: Tensor | int) -> Tensor:
        """abar_t (float64) for integer timesteps, on their device; t = -1 means "before the first step" (abar = 1)."""
        t = torch.as_tensor(t, dtype=torch.long)
        table = self._abar_tables.get(t.device)
        if table is None:
            table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod]).to(t.device)
            self._abar_tables[t.device] = table
        return table[t + 1]

    def sigmas(self) -> Tensor:
        """Variance-exploding noise levels sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, sec. 2).

        A zero-terminal-SNR schedule has sigma_T = inf; as diffusers does, abar_T = 0 is replaced by 2^-24 here."""
        abar = self.alphas_cumprod
        abar = torch.where(abar > 0, abar, torch.full_like(abar, 2.0**-24))
        return ((1 - abar) / abar).sqrt()

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (used by min-SNR weighting)."""
        abar = self.abar(t)
        return abar / (1 - abar)
