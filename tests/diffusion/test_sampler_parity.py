"""Every x_t of the sampling trajectory equals diffusers' schedulers (the reference) for the same schedule, fake
model and injected noise: DDPM, DDIM (eta 0 and 1), Euler, Euler ancestral, DPM-Solver++(2M) (+ Karras)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.diffusion.samplers import _sigma_plan, ddim, ddpm, dpmpp_2m, euler, make_timesteps  # noqa: E402
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


@pytest.fixture
def float32_noise(monkeypatch):
    """Both sides draw the ancestral noise in float32 whatever the sample's dtype, so that a float64 run sees the
    same numbers as a float32 one."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as reference_module

    import ldm.diffusion.samplers as ours_module

    draw = reference_module.randn_tensor
    monkeypatch.setattr(reference_module, "randn_tensor",
                        lambda shape, dtype=None, **kw: draw(shape, dtype=torch.float32, **kw).to(dtype))
    monkeypatch.setattr(ours_module, "_noise",
                        lambda x, g: torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype))


def euler_reference_float64(sched, schedule, ts, karras):
    """diffusers' Euler trajectory computed in float64 on our float64 noise levels.

    diffusers keeps sigmas and the variance-exploding sample x_ve = x0 + sigma eps in float32. Where sigma is
    large (20291 at the cosine schedule's clipped end) x_ve carries a rounding error ~1e-3 that its step
    x_ve + d (sigma_next - sigma) does not cancel: its float32 trajectory is off the exact one by up to 6e-4
    (24x the tolerance) and by a different amount on each CPU kernel (ATEN_CPU_CAPABILITY). Its sigmas are
    checked against ours first (they agree to float32 rounding); then the same steps run in float64."""
    sigmas, _ = _sigma_plan(schedule, ts, karras, round_t=False)
    torch.testing.assert_close(sched.sigmas.double(), sigmas, rtol=1e-6, atol=0)
    sched.sigmas = sigmas
    x_ve = start_noise().double() * (1 + sigmas[0] ** 2).sqrt()
    return run_reference(sched, x_ve, scale_in=True)


def assert_euler_matches(sched, schedule, ts, karras, ancestral):
    ref = euler_reference_float64(sched, schedule, ts, karras)
    x = start_noise()
    # The algorithm: in float64 both sides agree to 1e-5 whatever the kernels round.
    assert_same([t.float() for t in run_ours(euler, schedule, ts, x.double(), karras=karras, ancestral=ancestral)],
                [t.float() for t in ref])
    # float32 (what sampling runs in) loses no more than its rounding, relative to the step's scale: the
    # cosine + epsilon + Karras trajectory of this fake model grows from |x| ~ 5 to ~4e4, so elements near 0
    # cannot be checked to 1e-5 absolute in float32.
    for i, (a, b) in enumerate(zip(run_ours(euler, schedule, ts, x, karras=karras, ancestral=ancestral), ref)):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, atol=1e-5 * scale, rtol=0, msg=lambda m: f"float32 step {i}: {m}")


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("spacing,karras", [("linspace", False), ("leading", False), ("trailing", False),
                                            ("linspace", True)])
def test_euler_matches_diffusers(kind, pred, spacing, karras):
    sched = diffusers.EulerDiscreteScheduler(beta_schedule=DIFFUSERS_BETA[kind], **RANGE[kind], prediction_type=pred,
                                             timestep_spacing=spacing, use_karras_sigmas=karras)
    schedule = _schedule(kind, pred)
    same_schedule(sched, schedule).set_timesteps(STEPS)
    assert_euler_matches(sched, schedule, make_timesteps(schedule, STEPS, spacing), karras, ancestral=False)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_euler_ancestral_matches_diffusers(kind, pred, float32_noise):
    sched = diffusers.EulerAncestralDiscreteScheduler(beta_schedule=DIFFUSERS_BETA[kind], **RANGE[kind], prediction_type=pred,
                                                      timestep_spacing="trailing")
    schedule = _schedule(kind, pred)
    same_schedule(sched, schedule).set_timesteps(STEPS)
    assert_euler_matches(sched, schedule, make_timesteps(schedule, STEPS, "trailing"), False, ancestral=True)


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
