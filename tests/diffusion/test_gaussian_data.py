"""With the analytically optimal denoiser for data ~ N(mu, s^2), every sampler reproduces the data's mean and std
from pure noise. Also the closed-form identities of the DDPM posterior, eq. (7)."""

import math

import pytest
import torch

from ldm.diffusion.process import output_from_x0_eps
from ldm.diffusion.samplers import SAMPLERS, make_timesteps
from ldm.diffusion.schedules import NoiseSchedule

MU, STD = 0.6, 0.3


def optimal_model(schedule: NoiseSchedule):
    """E[x0 | x_t] for x0 ~ N(MU, STD^2): MU + a STD^2 / (a^2 STD^2 + s^2) (x_t - a MU), as the model's target."""
    sigmas = schedule.sigmas()
    T = len(sigmas)

    def model(x, t, context=None):
        t = t.double()
        lo = t.floor().long().clamp(0, T - 1)
        hi = (lo + 1).clamp(max=T - 1)
        sig = sigmas[lo] * (1 - (t - lo)) + sigmas[hi] * (t - lo)  # same interpolation as the samplers
        a = 1 / (1 + sig**2).sqrt()
        s = sig * a
        a4, s4 = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
        x0 = MU + a4 * STD**2 / (a4**2 * STD**2 + s4**2) * (x.double() - a4 * MU)
        eps = (x.double() - a4 * x0) / s4
        return output_from_x0_eps(x0, eps, a, s, schedule.prediction_type).float()

    return model


def start_sample(schedule, t, noise):
    """x_t drawn from the true marginal N(a MU, a^2 STD^2 + s^2) at the first timestep. Pure N(0, I) noise is off
    by a_T MU in the mean where abar_T > 0 (SD's schedule: a_T = 0.068), an error of the schedule that a
    deterministic sampler carries to the end (Lin et al. 2023); starting on the marginal isolates the sampler."""
    abar = schedule.abar(int(round(float(t)))).item()
    return abar**0.5 * MU + (abar * STD**2 + 1 - abar) ** 0.5 * noise


# (sampler, options, steps, tolerance on mean and std). Narrow data (STD = 0.3 < 1) is the hard case for few
# steps: the denoiser changes fastest near sigma ~ STD, so first-order samplers need a few hundred steps for 1e-2.
CASES = [
    ("ddpm", {}, 1000, 0.01),
    ("ddim", {"eta": 0.0}, 500, 0.01),
    ("ddim", {"eta": 1.0}, 1000, 0.01),
    ("euler", {}, 500, 0.01),
    ("euler", {"karras": True}, 200, 0.01),
    ("euler_ancestral", {}, 1000, 0.01),
    ("dpmpp_2m", {}, 500, 0.01),
    ("dpmpp_2m", {"karras": True}, 50, 0.01),
]


@pytest.mark.parametrize("name,options,steps,tol", CASES)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_samplers_reproduce_gaussian_data(name, options, steps, tol, pred):
    schedule = NoiseSchedule.make("scaled_linear", prediction_type=pred)
    ts = make_timesteps(schedule, steps, "linspace")  # ends at t = 0
    g = torch.Generator().manual_seed(0)
    x = start_sample(schedule, ts[0], torch.randn(16, 1, 32, 32, generator=g))
    x = SAMPLERS[name](optimal_model(schedule), x, schedule, ts, generator=g, **options)
    assert x.mean().item() == pytest.approx(MU, abs=tol)
    assert x.std().item() == pytest.approx(STD, abs=tol)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_error_shrinks_with_more_steps(name):
    schedule = NoiseSchedule.make("scaled_linear")
    errors = []
    for steps in (20, 80):
        ts = make_timesteps(schedule, steps, "linspace")
        g = torch.Generator().manual_seed(0)
        x = start_sample(schedule, ts[0], torch.randn(16, 1, 32, 32, generator=g))
        x = SAMPLERS[name](optimal_model(schedule), x, schedule, ts, generator=g)
        errors.append(abs(x.std().item() - STD))
    assert errors[1] < errors[0]


def test_zero_terminal_snr_starts_from_pure_noise():
    """With abar_T = 0, x_T ~ N(0, I) exactly: pure noise is the right start and the mean comes out right."""
    schedule = NoiseSchedule.make("scaled_linear", rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    for name, steps in (("ddim", 500), ("dpmpp_2m", 200)):
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(16, 1, 32, 32, generator=g)
        x = SAMPLERS[name](optimal_model(schedule), noise, schedule, make_timesteps(schedule, steps, "linspace"),
                           generator=g)
        assert x.mean().item() == pytest.approx(MU, abs=0.01), name
        assert x.std().item() == pytest.approx(STD, abs=0.015), name


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_posterior_eq7_identities(kind):
    """eq. (7): with x_t = sqrt(abar_t) x0 exactly, mu = sqrt(abar_{t-1}) x0, i.e.
    c_x0 + c_xt sqrt(abar_t) = sqrt(abar_{t-1}); and the variances add up:
    c_xt^2 (1 - abar_t) + beta-tilde_t = 1 - abar_{t-1}  (marginal of x_{t-1})."""
    s = NoiseSchedule.make(kind)
    for t in (1, 5, 100, 500, 998):
        abar_t, abar_p = s.alphas_cumprod[t].item(), s.alphas_cumprod[t - 1].item()
        beta = s.betas[t].item()
        c_x0 = math.sqrt(abar_p) * beta / (1 - abar_t)
        c_xt = math.sqrt(1 - beta) * (1 - abar_p) / (1 - abar_t)
        beta_tilde = (1 - abar_p) / (1 - abar_t) * beta
        assert c_x0 + c_xt * math.sqrt(abar_t) == pytest.approx(math.sqrt(abar_p), rel=1e-10)
        assert c_xt**2 * (1 - abar_t) + beta_tilde == pytest.approx(1 - abar_p, rel=1e-8)
        assert beta_tilde <= beta


def test_timestep_spacings():
    s = NoiseSchedule.make("linear")
    assert make_timesteps(s, 4, "leading").tolist() == [750, 500, 250, 0]
    assert make_timesteps(s, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert make_timesteps(s, 4, "linspace").tolist() == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="spacing"):
        make_timesteps(s, 4, "random")
    with pytest.raises(ValueError, match="num_steps"):
        make_timesteps(s, 0)
