"""Flow matching: the rectified-flow forward process, its velocity target and SD3's timestep shifts.

Rectified flow (Liu et al. 2022; Lipman et al. 2023), as Stable Diffusion 3 trains it (Esser et al. 2024, sec. 2-3):

    x_t = (1 - t) x_0 + t eps,   t in [0, 1]  (t = sigma: 0 is the clean latent, 1 pure noise)   SD3 sec. 3.1, RF
    v   = dx_t / dt = eps - x_0                (the network's target, the conditional velocity u_t(x_t | eps))

so from a velocity prediction: x0-hat = x_t - t v, eps-hat = x_t + (1 - t) v.

Timestep shift (SD3 sec. 5.3.2, eq. (23)): a resolution with more pixels needs more noise for the same
"perceived" noise level, so every sigma is moved towards 1:

    shift_alpha(sigma) = alpha sigma / (1 + (alpha - 1) sigma)      (SD3, SD3.5: alpha = 3.0)

Resolution-dependent shift (diffusers' ``use_dynamic_shifting``, Flux): with mu linear in the image's token count
n = (h / p) (w / p) between (base_seq_len, base_shift) and (max_seq_len, max_shift) (diffusers'
``calculate_shift``), sigma' = e^mu / (e^mu + (1 / sigma - 1)); this is shift_alpha with alpha = e^mu
(alpha sigma / (alpha sigma + 1 - sigma)), so one function serves both.

Discrete training timesteps t in {0, ..., T-1} index the (shifted) table sigma_t = shift((t + 1) / T), which is
diffusers' FlowMatchEulerDiscreteScheduler's training table (``linspace(1, T, T) / T`` shifted) read in ascending
order; the network sees the timestep sigma * T (1 .. T), as diffusers' SD3 pipeline feeds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.process import _bcast

FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
FLOW_SPACINGS = ("table", "flux")  # inference sigmas: the scheduler's table (SD3), FluxPipeline's linspace(1, 1/n, n)


@dataclass(frozen=True)
class FlowMatching:
    """The flow-matching "schedule": what the network predicts (the velocity eps - x_0) and the sigma shift.

    shift: SD3's fixed alpha (1.0: no shift); dynamic_shift: alpha = e^mu from the image token count instead
    (patch_size latent pixels per token side); weighting: SD3's loss weightings (diffusers
    ``compute_loss_weighting_for_sd3``): none, sigma_sqrt (sigma^-2), cosmap (2 / (pi (1 - 2 sigma + 2 sigma^2))).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    patch_size: int = 2
    weighting: str = "none"
    spacing: str = "table"
    prediction_type: str = "flow"  # what the network outputs: the velocity (named for config checks and metadata)

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"schedule.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not self.shift > 0:
            raise ValueError(f"schedule.shift must be > 0 (1.0: no shift; SD3 uses 3.0), got {self.shift}")
        if self.max_seq_len <= self.base_seq_len or self.base_seq_len < 1:
            raise ValueError(f"schedule.max_seq_len ({self.max_seq_len}) must exceed schedule.base_seq_len "
                             f"({self.base_seq_len}) >= 1")
        if self.patch_size < 1:
            raise ValueError(f"schedule.patch_size must be >= 1, got {self.patch_size}")
        if self.weighting not in FLOW_WEIGHTINGS:
            raise ValueError(f"schedule.weighting must be one of {FLOW_WEIGHTINGS}, got {self.weighting!r}")
        if self.spacing not in FLOW_SPACINGS:
            raise ValueError(f"schedule.spacing must be one of {FLOW_SPACINGS}, got {self.spacing!r}")
        if self.prediction_type != "flow":
            raise ValueError(f"a flow-matching schedule predicts the velocity: prediction_type must be 'flow', got "
                             f"{self.prediction_type!r} (use schedule=scaled_linear or scaled_linear_v for eps / v)")

    # ------------------------------------------------------------------------------------------------- shifts
    def mu(self, image_seq_len: int) -> float:
        """diffusers' ``calculate_shift``: mu linear in the token count, base_shift at base_seq_len and max_shift
        at max_seq_len."""
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return image_seq_len * m + self.base_shift - m * self.base_seq_len

    def seq_len(self, latent_shape: tuple[int, ...]) -> int:
        """Image tokens of a latent (..., h, w): (h // p) (w // p), as SD3 / Flux pipelines count them."""
        return (latent_shape[-2] // self.patch_size) * (latent_shape[-1] // self.patch_size)

    def alpha(self, image_seq_len: int | None = None) -> float:
        """The shift factor: the fixed shift, or e^mu of the resolution (dynamic_shift)."""
        if not self.dynamic_shift:
            return self.shift
        if image_seq_len is None:
            raise ValueError("schedule.dynamic_shift=true shifts by the image size: pass the image token count")
        return math.exp(self.mu(image_seq_len))

    def shifted(self, sigma: Tensor, image_seq_len: int | None = None) -> Tensor:
        """SD3 eq. (23): alpha sigma / (1 + (alpha - 1) sigma)."""
        a = self.alpha(image_seq_len)
        return a * sigma / (1 + (a - 1) * sigma)

    # ------------------------------------------------------------------------------------------------ training
    def sigma(self, t: Tensor, image_seq_len: int | None = None) -> Tensor:
        """sigma_t = shift((t + 1) / T) (float64, on t's device) for integer training timesteps t in 0..T-1."""
        u = (torch.as_tensor(t).to(torch.float64) + 1) / self.num_train_timesteps
        return self.shifted(u, image_seq_len)

    def model_timestep(self, sigma: Tensor) -> Tensor:
        """What the network is given for a noise level: sigma * T (float32), diffusers' SD3 ``timestep``."""
        return (sigma * self.num_train_timesteps).to(torch.float32)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """SD3's per-sample loss weighting (diffusers ``compute_loss_weighting_for_sd3``), float32."""
        if self.weighting == "sigma_sqrt":
            w = sigma**-2.0
        elif self.weighting == "cosmap":
            w = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        else:
            w = torch.ones_like(sigma)
        return w.to(torch.float32)

    # ----------------------------------------------------------------------------------------------- inference
    def inference_sigmas(self, num_steps: int, image_seq_len: int | None = None) -> Tensor:
        """Descending sigmas of ``num_steps`` Euler steps (float64, without the final 0), as diffusers'
        FlowMatchEulerDiscreteScheduler.set_timesteps builds them: n points evenly spaced in timestep between
        the training table's ends (sigma_max = 1 and sigma_min = its smallest entry: shift(1 / T) with a fixed
        shift, 1 / T with the dynamic one, whose table is unshifted), then shifted; spacing "flux": the sigmas
        FluxPipeline gives it, 1, 1 - 1/n, ..., 1/n, then shifted."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_train_timesteps}], got {num_steps}")
        T = self.num_train_timesteps
        if self.spacing == "flux":  # FluxPipeline: np.linspace(1, 1 / n, n), float32 in its scheduler, then shifted
            sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).float().double()
            return self.shifted(sigmas, image_seq_len)
        edge = torch.tensor([1.0, 1.0 / T], dtype=torch.float64)
        table_max, table_min = (edge if self.dynamic_shift else self.shifted(edge)).tolist()
        # diffusers keeps its table in float32: its ends are float32 numbers
        table_max, table_min = (torch.tensor([table_max, table_min], dtype=torch.float32).double() * T).tolist()
        sigmas = torch.linspace(table_max, table_min, num_steps, dtype=torch.float64) / T
        return self.shifted(sigmas, image_seq_len)

    def inference_timesteps(self, num_steps: int, image_seq_len: int | None = None) -> Tensor:
        """The samplers' ``timesteps`` for flow matching: sigma * T, descending (float64)."""
        return self.inference_sigmas(num_steps, image_seq_len) * self.num_train_timesteps


def flow_forward(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_t = (1 - sigma) x_0 + sigma eps (SD3 sec. 3.1, rectified flow: a_t = 1 - t, b_t = t); sigma scalar or (B,)."""
    s = _bcast(torch.as_tensor(sigma), x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity v = dx_t / dt = eps - x_0."""
    return noise - x0


def x0_eps_from_velocity(v: Tensor, x_t: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0-hat, eps-hat) = (x_t - sigma v, x_t + (1 - sigma) v)."""
    s = _bcast(torch.as_tensor(sigma), x_t)
    return x_t - s * v, x_t + (1 - s) * v
