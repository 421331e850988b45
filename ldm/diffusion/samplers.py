"""Samplers: DDPM, DDIM, Euler (ancestral) and DPM-Solver++(2M) over one discrete eps/v/x0 model, and flow Euler
over a flow-matching (velocity) model.

One signature for all (k-diffusion style, plus a generator):

    sampler(model, x, schedule, timesteps, *, cond=None, guidance_scale=1.0, generator=None, callback=None,
            classifier=None, **options) -> x0

- ``model(x, t, context)`` is the U-Net; ``x`` is the variance-preserving sample x_t at ``timesteps[0]``
  (unit Gaussian noise for text-to-image, a forward-noised latent for image-to-image);
- ``timesteps`` is a descending 1-D tensor from :func:`make_timesteps` (or any subset of 0..T-1);
- ``callback(i, t, x, x0)`` gets the sample after step i (variance-preserving form) and the x0 prediction;
- ``step_hook(i, x, a, s) -> x`` may replace the sample after step i (before the callback); x is in
  variance-preserving form x = a x0 + s eps at the next noise level (a = 1, s = 0 after the last step).
  Inpainting uses it to paste the forward-noised known region back in at every step;
- all randomness comes from ``generator``: the same seed gives the same result.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ldm.diffusion.guidance import (ClassifierGuidance, Conditioning, DiffusionModel, classifier_free_guidance,
                                   embedded_guidance)
from ldm.diffusion.process import x0_eps_from_output
from ldm.diffusion.schedules import NoiseSchedule

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
Callback = Callable[[int, float, Tensor, Tensor], None]
StepHook = Callable[[int, Tensor, float, float], Tensor]


def make_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """Descending inference timesteps (float64) with the spacings of Lin et al. 2023, Table 2.

    leading: 0, k, 2k, ... (+ steps_offset), k = T // n; trailing: T-1, T-1-T/n, ...; linspace: n evenly spaced
    points of [0, T-1] (fractional: DDPM/DDIM round them, Euler interpolates sigma between training steps).
    Stable Diffusion's sampling (CompVis' ``make_ddim_timesteps`` ``range(0, T, k) + 1``, diffusers'
    ``steps_offset=1``) is leading with steps_offset 1: 1, 1 + k, ..., 1 + (n-1) k.
    """
    T = schedule.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    if steps_offset < 0 or (steps_offset and spacing != "leading"):
        raise ValueError(f"steps_offset must be >= 0 and only applies to leading spacing; got {steps_offset} with "
                         f"{spacing!r} spacing")
    if spacing == "leading":
        ts = torch.arange(num_steps, dtype=torch.float64) * (T // num_steps) + steps_offset
        if ts[-1] > T - 1:
            raise ValueError(f"{num_steps} leading steps with steps_offset={steps_offset} reach timestep "
                             f"{int(ts[-1])}, past the schedule's last one ({T - 1}); use fewer steps or steps_offset=0")
    elif spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / num_steps, dtype=torch.float64)) - 1
        ts = ts.flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, num_steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    return ts.flip(0)


def strength_timesteps(timesteps: Tensor, strength: float) -> Tensor:
    """Image-to-image: keep the last ``strength`` fraction of the steps (0 keeps none, 1 keeps all)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    keep = min(int(len(timesteps) * strength), len(timesteps))
    return timesteps[len(timesteps) - keep:]


class _Denoiser:
    """x_t (variance-preserving) at time t -> (x0-hat, eps-hat), with CFG and optional classifier guidance."""

    def __init__(self, model: DiffusionModel, schedule: NoiseSchedule, cond: Conditioning | None,
                 guidance_scale: float, classifier: ClassifierGuidance | None):
        self.model, self.schedule, self.cond = model, schedule, cond
        self.scale, self.classifier = guidance_scale, classifier

    def __call__(self, x: Tensor, t: float, a: float, s: float) -> tuple[Tensor, Tensor]:
        t_in = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)

        def denoise(x_in: Tensor) -> tuple[Tensor, Tensor]:
            out = classifier_free_guidance(self.model, x_in, t_in, self.cond, self.scale)
            return x0_eps_from_output(out, x_in, torch.tensor(a), torch.tensor(s), self.schedule.prediction_type)

        if self.classifier is None:
            return denoise(x)
        return self.classifier.guided_eps(x, t_in, torch.tensor(s), denoise)


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _next(ts: Tensor, i: int) -> int:
    return int(ts[i + 1]) if i + 1 < len(ts) else -1


@torch.no_grad()
def ddpm(model, x, schedule, timesteps, *, cond=None, guidance_scale=1.0, generator=None, callback=None,
         classifier=None, step_hook=None, variance: str = "fixed_small",
         clip_x0: float | None = None) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), in the seed's order: eq. (15) -> eq. (7) -> eq. (11).

    With skipped steps, alpha_t and beta_t are those of the jump t -> t_prev: alpha = abar_t / abar_prev.
    variance: "fixed_small" = posterior variance beta-tilde_t, "fixed_large" = beta_t.
    """
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
    denoise = _Denoiser(model, schedule, cond, guidance_scale, classifier)
    ts = timesteps.round().long()
    for i, t in enumerate(ts.tolist()):
        prev = _next(ts, i)
        abar_t, abar_prev = schedule.abar(t).item(), schedule.abar(prev).item()
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        # eq. (15): x0-hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        x0, _ = denoise(x, t, math.sqrt(abar_t), math.sqrt(1 - abar_t))
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        # eq. (7): mu = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        c_x0 = math.sqrt(abar_prev) * beta_t / (1 - abar_t)
        c_xt = math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)
        mean = c_x0 * x0 + c_xt * x
        if prev >= 0:
            # beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t  (eq. (7)), or beta_t ("fixed_large")
            var = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20) if variance == "fixed_small" else beta_t
            x = mean + math.sqrt(var) * _noise(x, generator)  # eq. (11): x_{t-1} = mu + sigma_t z
        else:
            x = mean  # the last step adds no noise
        if step_hook is not None:
            x = step_hook(i, x, math.sqrt(abar_prev), math.sqrt(1 - abar_prev))
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def ddim(model, x, schedule, timesteps, *, cond=None, guidance_scale=1.0, generator=None, callback=None,
         classifier=None, step_hook=None, eta: float = 0.0, final_alpha_one: bool = True,
         clip_x0: float | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. (12)); eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance.

    final_alpha_one: the step after the last timestep goes to abar_prev = 1, so eq. (12) returns x0-hat itself;
    False uses abar_prev = abar_0 of the training schedule, as Stable Diffusion samples (CompVis' DDIMSampler
    ``alphas_prev[0] = alphas_cumprod[0]``, diffusers' ``set_alpha_to_one=False``): the result keeps
    sqrt(1 - abar_0) (0.029 for SD's betas) of eps-hat.
    """
    denoise = _Denoiser(model, schedule, cond, guidance_scale, classifier)
    ts = timesteps.round().long()
    for i, t in enumerate(ts.tolist()):
        prev = _next(ts, i)
        abar_t = schedule.abar(t).item()
        abar_prev = schedule.abar(prev).item() if prev >= 0 or final_alpha_one else schedule.abar(0).item()
        x0, eps = denoise(x, t, math.sqrt(abar_t), math.sqrt(1 - abar_t))
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        # eq. (16): sigma_t(eta)^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)
        std = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        # eq. (12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - std**2, 0.0)) * eps
        if eta > 0:
            x = x + std * _noise(x, generator)
        if step_hook is not None:
            x = step_hook(i, x, math.sqrt(abar_prev), math.sqrt(1 - abar_prev))
        if callback is not None:
            callback(i, t, x, x0)
    return x


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. (5): sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: Tensor, train_sigmas: Tensor) -> Tensor:
    """The (fractional) training timestep of each sigma, by linear interpolation in log sigma."""
    log_train = train_sigmas.log()
    log_sigma = sigma.clamp(min=1e-10).log()
    low = ((log_train[None, :] <= log_sigma[:, None]).sum(1) - 1).clamp(0, len(train_sigmas) - 2)
    w = ((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1])).clamp(0, 1)
    return low + w


def _sigma_plan(schedule: NoiseSchedule, timesteps: Tensor, karras: bool, round_t: bool) -> tuple[Tensor, Tensor]:
    """Noise levels of the steps (with a final 0) and the model timesteps that go with them."""
    train = schedule.sigmas()
    ts = timesteps.to(torch.float64)
    T = len(train)
    # sigma at fractional t: linear interpolation between training steps
    lo = ts.floor().long().clamp(0, T - 1)
    hi = (lo + 1).clamp(max=T - 1)
    frac = ts - lo
    sigmas = train[lo] * (1 - frac) + train[hi] * frac
    if karras:
        sigmas = karras_sigmas(sigmas[0].item(), sigmas[-1].item(), len(sigmas))
        ts = sigma_to_t(sigmas, train)
        if round_t:
            ts = ts.round()
    return torch.cat([sigmas, sigmas.new_zeros(1)]), ts


def _vp(sigma: float) -> tuple[float, float]:
    """sigma (variance exploding) -> (a, s) of the variance-preserving x_t = a x0 + s eps."""
    a = 1 / math.sqrt(1 + sigma**2)
    return a, sigma * a


@torch.no_grad()
def euler(model, x, schedule, timesteps, *, cond=None, guidance_scale=1.0, generator=None, callback=None,
          classifier=None, step_hook=None, karras: bool = False, ancestral: bool = False) -> Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - x0-hat) / sigma (Karras et al. 2022, Algorithm 1
    without churn) on the variance-exploding sample x_ve = x_vp sqrt(1 + sigma^2) = x0 + sigma eps.

    ancestral: step down to sigma_down and add fresh noise of std sigma_up (k-diffusion's Euler-a).

    The state is kept in variance-preserving form and the derivative is taken as eps-hat, which it equals
    exactly: d = (x_ve - x0-hat) / sigma = eps-hat. Stepping x_ve itself in float32 loses precision where
    sigma is large (sigma_max = 20291 for the cosine schedule, whose beta is clipped at 0.999 at its end):
    x_ve ~ sigma |x| carries an absolute rounding error ~1e-3, and x_ve + d (sigma_next - sigma) cancels
    two numbers of that size.
    """
    denoise = _Denoiser(model, schedule, cond, guidance_scale, classifier)
    sigmas, ts = _sigma_plan(schedule, timesteps, karras, round_t=False)
    for i in range(len(ts)):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        a, s = _vp(sigma)
        x0, eps = denoise(x, ts[i].item(), a, s)
        a_next, s_next = _vp(sigma_next)
        if ancestral:
            sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
            # x_ve' = x_ve + d (sigma_down - sigma) + sigma_up z = x0 + sigma_down eps + sigma_up z, times a_next
            x = a_next * (x0 + sigma_down * eps + sigma_up * _noise(x, generator))
        else:
            # x_ve' = x_ve + d (sigma_next - sigma) = x0 + sigma_next eps, times a_next: s_next = a_next sigma_next
            x = a_next * x0 + s_next * eps
        if step_hook is not None:
            x = step_hook(i, x, a_next, s_next)
        if callback is not None:
            callback(i, ts[i].item(), x, x0)
    return x


def euler_ancestral(model, x, schedule, timesteps, **kwargs) -> Tensor:
    return euler(model, x, schedule, timesteps, ancestral=True, **kwargs)


@torch.no_grad()
def dpmpp_2m(model, x, schedule, timesteps, *, cond=None, guidance_scale=1.0, generator=None, callback=None,
             classifier=None, step_hook=None, karras: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in data-prediction form, on the variance-preserving sample.

    lambda = log(a / s) = -log sigma; first-order (DDIM) update at the first and the final step.
    Karras timesteps are rounded to training steps, as the model was trained on them.
    """
    denoise = _Denoiser(model, schedule, cond, guidance_scale, classifier)
    sigmas, ts = _sigma_plan(schedule, timesteps, karras, round_t=True)
    x0_prev, h_prev = None, None
    n = len(ts)
    for i in range(n):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        a, s = _vp(sigma)
        x0, _ = denoise(x, ts[i].item(), a, s)
        if sigma_next == 0:
            x = x0  # lambda -> inf: the update lands on the data prediction
        else:
            a_next, s_next = _vp(sigma_next)
            h = math.log(sigma / sigma_next)  # lambda_next - lambda
            if x0_prev is None or i == n - 1:
                d = x0  # first order
            else:
                r = h_prev / h
                d = x0 + (x0 - x0_prev) / (2 * r)  # eq. (4.4) of DPM-Solver++, midpoint form
            x = (s_next / s) * x - a_next * math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        if step_hook is not None:
            x = step_hook(i, x, *_vp(sigma_next))
        if callback is not None:
            callback(i, ts[i].item(), x, x0)
    return x


@torch.no_grad()
def flow_euler(model, x, schedule, timesteps, *, cond=None, guidance_scale=1.0, generator=None, callback=None,
               classifier=None, step_hook=None) -> Tensor:
    """Euler steps of flow matching's ODE dx/dsigma = v(x, sigma) (rectified flow; SD3's sampler, diffusers'
    FlowMatchEulerDiscreteScheduler): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v-hat, down to sigma = 0.

    ``schedule`` is a :class:`~ldm.diffusion.flow.FlowMatching`; ``timesteps`` are the network's timesteps
    sigma * T, descending (``FlowMatching.inference_timesteps``); ``x`` is x_sigma = (1 - sigma) x0 + sigma eps
    at the first of them (pure noise at sigma = 1). CFG applies to the velocity (it is linear in it); a
    guidance-distilled model (FLUX.1-dev) gets ``guidance_scale`` as its guidance input instead
    (:func:`~ldm.diffusion.guidance.embedded_guidance`). The state given to ``step_hook`` is x = a x0 + s eps with
    a = 1 - sigma_next, s = sigma_next.
    """
    if classifier is not None:
        raise ValueError("classifier guidance is defined here for eps / v models on a noise schedule, not for the "
                         "flow_euler sampler: drop the classifier scorer")
    if getattr(schedule, "prediction_type", None) != "flow":
        raise ValueError("the flow_euler sampler needs a flow-matching model (schedule=flow); this model predicts "
                         f"{getattr(schedule, 'prediction_type', '?')!r}: use ddim, euler, ...")
    cond, guidance_scale = embedded_guidance(model, cond, guidance_scale)
    T = schedule.num_train_timesteps
    # diffusers keeps float32 sigmas and gives the network float32 sigma * T: the same numbers here
    sigmas32 = torch.cat([timesteps.to(torch.float64) / T, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
    for i in range(len(timesteps)):
        t_in = (sigmas32[i] * T).expand(x.shape[0]).to(x.device)
        v = classifier_free_guidance(model, x, t_in, cond, guidance_scale)
        sigma, sigma_next = sigmas32[i].item(), sigmas32[i + 1].item()
        x0 = x - sigma * v  # x0-hat = x_sigma - sigma v
        dt = (sigmas32[i + 1] - sigmas32[i]).item()
        x = (x.float() + dt * v.float()).to(x.dtype)
        if step_hook is not None:
            x = step_hook(i, x, 1 - sigma_next, sigma_next)
        if callback is not None:
            callback(i, float(t_in[0]), x, x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
    "flow_euler": flow_euler,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
