"""Every x_t of the sampling trajectory equals diffusers' schedulers (the reference) for the same schedule, fake
model and injected noise: DDPM, DDIM (eta 0 and 1), Euler, Euler ancestral, DPM-Solver++(2M) (+ Karras)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.diffusion.samplers import ddim, ddpm, dpmpp_2m, euler, make_timesteps  # noqa: E402
from ldm.diffusion.schedules import NoiseSchedule  # noqa: E402

DIFFUSERS_BETA = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
RANGE = {"linear": dict(beta_start=1e-4, beta_end=0.02), "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
         "cosine": {}}
SCHEDULES = ["linear", "scaled_linear", "cosine"]
PREDICTIONS = ["epsilon", "v_prediction"]
STEPS = 10  # divides T: diffusers steps DDPM/DDIM back by T // n, not to the next listed timestep


def fake_model(x, t, context=None):
    """A deterministic nonlinear 'network' of x and t (t scalar or (B,))."""
    t = torch.as_tensor(t, dtype=torch.float32)
    t = t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t
    return 0.8 * torch.tanh(0.7 * x) + 0.1 * torch.cos(t / 150.0) * x.mean(dim=(1, 2, 3), keepdim=True)


def start_noise():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(123))


def run_ours(sampler, schedule, timesteps, x, **kw):
    traj = []
    sampler(fake_model, x, schedule, timesteps, generator=torch.Generator().manual_seed(7),
            callback=lambda i, t, xt, x0: traj.append(xt.clone()), **kw)
    return traj


def run_reference(sched, x, scale_in=False):
    """diffusers' loop; returns the trajectory in variance-preserving form."""
    g = torch.Generator().manual_seed(7)
    traj = []
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t) if scale_in else x
        x = sched.step(fake_model(inp, t), t, x, generator=g).prev_sample
        if scale_in:  # variance exploding -> variance preserving
            traj.append(x / (1 + sched.sigmas[i + 1].double() ** 2).sqrt().float())
        else:
            traj.append(x)
    return traj


def assert_same(ours, ref):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")


def _schedule(kind, pred):
    return NoiseSchedule.make(kind, prediction_type=pred)


def same_schedule(sched, schedule):
    """Give the reference our float64 abar: diffusers keeps a float32 cumprod, whose rounding grows to ~1e-6
    relative over 1000 steps and to ~1e-3 in sigma_min = sqrt((1 - abar_0) / abar_0). The schedules themselves
    are compared with diffusers' in test_schedules.py."""
    abar = schedule.alphas_cumprod
    sched.alphas_cumprod = abar
    if hasattr(sched, "lambda_t"):  # DPM-Solver caches these at construction
        sched.alpha_t, sched.sigma_t = abar.sqrt(), (1 - abar).sqrt()
        sched.lambda_t = sched.alpha_t.log() - sched.sigma_t.log()
    return sched


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("spacing,variance", [("leading", "fixed_small"), ("trailing", "fixed_small"),
                                              ("leading", "fixed_large")])
def test_ddpm_matches_diffusers(kind, pred, spacing, variance):
    sched = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_BETA[kind], **RANGE[kind], prediction_type=pred, clip_sample=False,
                                    timestep_spacing=spacing, variance_type=variance)
    schedule = _schedule(kind, pred)
    same_schedule(sched, schedule).set_timesteps(STEPS)
    ts = make_timesteps(schedule, STEPS, spacing)
    assert ts.long().tolist() == sched.timesteps.tolist()
    x = start_noise()
    assert_same(run_ours(ddpm, schedule, ts, x, variance=variance), run_reference(sched, x))


def test_ddpm_full_chain_matches_diffusers():
    """T = 1000 single steps (no skipping), the textbook Algorithm 2."""
    sched = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False)
    schedule = NoiseSchedule.make("linear")
    same_schedule(sched, schedule).set_timesteps(1000)
    ts = make_timesteps(schedule, 1000)
    x = start_noise()
    ours, ref = run_ours(ddpm, schedule, ts, x), run_reference(sched, x)
    assert_same(ours[::50] + ours[-1:], ref[::50] + ref[-1:])


def test_ddpm_clip_matches_diffusers():
    sched = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=True, clip_sample_range=1.0)
    schedule = NoiseSchedule.make("linear")
    same_schedule(sched, schedule).set_timesteps(STEPS)
    x = start_noise() * 3
    assert_same(run_ours(ddpm, schedule, make_timesteps(schedule, STEPS), x, clip_x0=1.0), run_reference(sched, x))


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(kind, pred, eta, spacing):
    sched = diffusers.DDIMScheduler(beta_schedule=DIFFUSERS_BETA[kind], **RANGE[kind], prediction_type=pred, clip_sample=False,
                                    timestep_spacing=spacing, set_alpha_to_one=True)
    schedule = _schedule(kind, pred)
    same_schedule(sched, schedule).set_timesteps(STEPS)
    ts = make_timesteps(schedule, STEPS, spacing)
    x = start_noise()
    g = torch.Generator().manual_seed(7)
    ref, xr = [], x
    for t in sched.timesteps:
        xr = sched.step(fake_model(xr, t), t, xr, eta=eta, generator=g).prev_sample
        ref.append(xr)
    assert_same(run_ours(ddim, schedule, ts, x, eta=eta), ref)


def test_ddim_sd_final_alpha():
    """SD's scheduler config: set_alpha_to_one=False, steps_offset=1."""
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    schedule = NoiseSchedule.make("scaled_linear")
    same_schedule(sched, schedule).set_timesteps(STEPS)
    ts = make_timesteps(schedule, STEPS, "leading", steps_offset=1)
    x = start_noise()
    ref, xr = [], x
    for t in sched.timesteps:
        xr = sched.step(fake_model(xr, t), t, xr).prev_sample
        ref.append(xr)
    assert_same(run_ours(ddim, schedule, ts, x, final_alpha_one=False), ref)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("spacing,karras", [("linspace", False), ("leading", False), ("trailing", False),
                                            ("linspace", True)])
def test_euler_matches_diffusers(kind, pred, spacing, karras):
    sched = diffusers.EulerDiscreteScheduler(beta_schedule=DIFFUSERS_BETA[kind], **RANGE[kind], prediction_type=pred,
                                             timestep_spacing=spacing, use_karras_sigmas=karras)
    schedule = _schedule(kind, pred)
    same_schedule(sched, schedule).set_timesteps(STEPS)
    ts = make_timesteps(schedule, STEPS, spacing)
    x_vp = start_noise()
    x_ve = x_vp * (1 + sched.sigmas[0].double() ** 2).sqrt().float()
    assert_same(run_ours(euler, schedule, ts, x_vp, karras=karras), run_reference(sched, x_ve, scale_in=True))


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_euler_ancestral_matches_diffusers(kind, pred):
    sched = diffusers.EulerAncestralDiscreteScheduler(beta_schedule=DIFFUSERS_BETA[kind], **RANGE[kind], prediction_type=pred,
                                                      timestep_spacing="trailing")
    schedule = _schedule(kind, pred)
    same_schedule(sched, schedule).set_timesteps(STEPS)
    x_vp = start_noise()
    x_ve = x_vp * (1 + sched.sigmas[0].double() ** 2).sqrt().float()
    ours = run_ours(euler, schedule, make_timesteps(schedule, STEPS, "trailing"), x_vp, ancestral=True)
    assert_same(ours, run_reference(sched, x_ve, scale_in=True))


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers(kind, pred, karras):
    if karras and kind == "cosine":
        pytest.skip("diffusers leaves Karras timesteps fractional for the cosine schedule only; we always round")
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule=DIFFUSERS_BETA[kind], **RANGE[kind], prediction_type=pred,
                                                  algorithm_type="dpmsolver++", solver_order=2,
                                                  timestep_spacing="trailing", use_karras_sigmas=karras)
    schedule = _schedule(kind, pred)
    same_schedule(sched, schedule).set_timesteps(STEPS)
    # Karras in diffusers' DPM spans the whole training range: linspace spacing gives the same end points.
    ts = make_timesteps(schedule, STEPS, "linspace" if karras else "trailing")
    x = start_noise()
    assert_same(run_ours(dpmpp_2m, schedule, ts, x, karras=karras), run_reference(sched, x))


def test_same_seed_same_result_and_different_seed_differs():
    schedule = NoiseSchedule.make("scaled_linear")
    ts = make_timesteps(schedule, 8)
    x = start_noise()
    for sampler, kw in [(ddpm, {}), (ddim, {"eta": 1.0}), (euler, {"ancestral": True})]:
        a = sampler(fake_model, x, schedule, ts, generator=torch.Generator().manual_seed(1), **kw)
        b = sampler(fake_model, x, schedule, ts, generator=torch.Generator().manual_seed(1), **kw)
        c = sampler(fake_model, x, schedule, ts, generator=torch.Generator().manual_seed(2), **kw)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
