"""Flow matching (ldm.diffusion.flow, the flow objective, the flow Euler sampler) against closed forms and
diffusers' FlowMatchEulerDiscreteScheduler."""

import math

import pytest
import torch

from ldm.diffusion.flow import FlowMatching, flow_forward, flow_target, x0_eps_from_velocity
from ldm.diffusion.guidance import Conditioning
from ldm.diffusion.losses import LossOptions
from ldm.diffusion.objectives import DiffusionObjective, FlowObjective, noised_batch, objective_for
from ldm.diffusion.samplers import flow_euler
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timestep_sampling import TimestepSampling

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402


def test_forward_process_target_and_inverse_are_the_closed_forms():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t = flow_forward(x0, eps, sigma)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    torch.testing.assert_close(x_t[1], 0.7 * x0[1] + 0.3 * eps[1])
    v = flow_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    # dx_t/dsigma is the velocity: a finite difference of the forward process
    h = 1e-3
    fd = (flow_forward(x0, eps, torch.full((3,), 0.5 + h)) - flow_forward(x0, eps, torch.full((3,), 0.5 - h))) / (2 * h)
    torch.testing.assert_close(fd, v, atol=1e-3, rtol=1e-3)
    x0_hat, eps_hat = x0_eps_from_velocity(v, x_t, sigma)
    torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(eps_hat[1:], eps[1:], atol=1e-6, rtol=0)


def test_fixed_shift_is_sd3_eq_23_and_dynamic_shift_is_it_with_alpha_e_mu():
    f = FlowMatching(shift=3.0)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(f.shifted(s), 3 * s / (1 + 2 * s))
    assert f.shifted(torch.tensor(0.5)).item() == pytest.approx(0.75)
    d = FlowMatching(dynamic_shift=True)
    assert d.mu(256) == pytest.approx(0.5) and d.mu(4096) == pytest.approx(1.15)
    assert d.mu(1024) == pytest.approx(0.5 + 0.65 * (1024 - 256) / (4096 - 256))
    mu = d.mu(1024)
    # diffusers' exponential time shift e^mu / (e^mu + (1/sigma - 1)) on the inner points
    inner = s[1:-1]
    torch.testing.assert_close(d.shifted(inner, 1024), math.exp(mu) / (math.exp(mu) + (1 / inner - 1)))
    assert d.seq_len((1, 16, 64, 32)) == 32 * 16
    with pytest.raises(ValueError, match="image token count"):
        d.shifted(inner)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_table_is_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ours = FlowMatching(shift=shift).sigma(torch.arange(1000))
    # diffusers' table is descending (sigma of index 0 is 1): ours ascends with t
    torch.testing.assert_close(ours.float(), ref.sigmas.flip(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs,seq", [({"shift": 3.0}, None), ({"shift": 1.0}, None),
                                        ({"dynamic_shift": True}, 1024), ({"dynamic_shift": True}, 64)])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_inference_sigmas_are_diffusers_set_timesteps(kwargs, seq, steps):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **{"use_dynamic_shifting": True}
                                          if kwargs.get("dynamic_shift") else kwargs)
    flow = FlowMatching(**kwargs)
    ref.set_timesteps(steps, mu=flow.mu(seq) if seq else None)
    ours = flow.inference_sigmas(steps, seq)
    torch.testing.assert_close(ours.float(), ref.sigmas[:-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(flow.inference_timesteps(steps, seq).float(), ref.timesteps, atol=1e-3, rtol=0)


class _Velocity(torch.nn.Module):
    """A toy velocity model that depends on x, t and the context (CFG must change its result)."""

    def forward(self, x, t, context):
        c = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(x) * (t.reshape(-1, 1, 1, 1) / 1000) + 0.3 * c - 0.1 * x


@pytest.mark.parametrize("shift,steps,scale", [(3.0, 8, 5.0), (1.0, 5, 1.0)])
def test_flow_euler_matches_diffusers_step_loop_with_cfg(shift, steps, scale):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g)
    cond = Conditioning(torch.randn(2, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g))
    model = _Velocity()
    flow = FlowMatching(shift=shift)
    ours = flow_euler(model, x.clone(), flow, flow.inference_timesteps(steps), cond=cond, guidance_scale=scale)
    # diffusers' StableDiffusion3Pipeline loop: [uncond; cond] in one batch, out_u + w (out_c - out_u), step()
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    latents = x.clone()
    for t in ref.timesteps:
        inp = torch.cat([latents, latents])
        ctx = torch.cat([cond.uncond_context.expand(2, -1, -1), cond.context])
        out_u, out_c = model(inp, t.expand(4), ctx).chunk(2)
        v = out_u + scale * (out_c - out_u) if scale != 1.0 else out_c
        latents = ref.step(v, t, latents, return_dict=False)[0]
    torch.testing.assert_close(ours, latents, atol=1e-5, rtol=0)


def test_flow_euler_with_an_exact_velocity_lands_on_the_data():
    """For x_1 = eps and the true velocity of one data point, every Euler step is exact: the result is x0."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    flow = FlowMatching(shift=3.0)
    out = flow_euler(lambda x, t, c: eps - x0, eps.clone(), flow, flow.inference_timesteps(6))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="flow-matching model"):
        flow_euler(lambda x, t, c: x, eps, NoiseSchedule.make(), flow.inference_timesteps(2))


def test_flow_objective_noises_and_targets_in_closed_form():
    flow = FlowMatching(shift=3.0, num_train_timesteps=100)
    obj = objective_for(flow)
    assert isinstance(obj, FlowObjective) and isinstance(objective_for(NoiseSchedule.make()), DiffusionObjective)
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    x_t, t, target = noised_batch(flow, x0, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # the same draws: t first, then the noise
    t_ref = torch.randint(0, 100, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, t_ref)
    sigma = 3 * ((t + 1) / 100) / (1 + 2 * ((t + 1) / 100))
    torch.testing.assert_close(x_t, (1 - sigma.reshape(-1, 1, 1, 1)) * x0 + sigma.reshape(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(target, eps - x0)
    torch.testing.assert_close(obj.model_timestep(t, x_t), (sigma * 100).float())


def test_flow_timesteps_use_the_samplers_logit_normal_is_centred():
    flow = FlowMatching(num_train_timesteps=1000)
    x0 = torch.zeros(20_000, 1, 1, 1)
    _, t, _ = noised_batch(flow, x0, generator=torch.Generator().manual_seed(0),
                           timesteps=TimestepSampling("logit_normal"))
    sigma = flow.sigma(t)
    # u = sigmoid(n), n ~ N(0, 1): median 0.5, P(u < sigmoid(1)) = Phi(1)
    assert sigma.median().item() == pytest.approx(0.5, abs=0.01)
    assert (sigma < 1 / (1 + math.exp(-1))).double().mean().item() == pytest.approx(0.8413, abs=0.01)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_flow_loss_is_the_weighted_mse_of_diffusers_sd3_weighting(weighting):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    flow = FlowMatching(num_train_timesteps=50, shift=3.0, weighting=weighting)
    obj = FlowObjective(flow)
    g = torch.Generator().manual_seed(5)
    out, target = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 17, 49])
    sigma = flow.sigma(t).float()
    w = compute_loss_weighting_for_sd3(weighting, sigma)
    # diffusers' train_dreambooth_sd3: mean over elements of w (pred - target)^2 per sample, then over the batch
    expected = (w.reshape(-1, 1, 1, 1) * (out - target) ** 2).reshape(3, -1).mean(1).mean()
    torch.testing.assert_close(obj.loss(out, target, t), expected, atol=1e-6, rtol=1e-6)


def test_flow_huber_snr_schedule_uses_sigma_over_one_minus_sigma():
    flow = FlowMatching(num_train_timesteps=10)
    obj = FlowObjective(flow)
    out, target = torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, 1, 2, 2)
    t = torch.tensor([4])  # sigma = 0.5: noise-to-signal 1
    c = (1 - 0.1) / (1 + 1.0) ** 2 + 0.1
    expected = 2 * c * (math.sqrt(0.25 + c**2) - c)
    assert obj.loss(out, target, t, options=LossOptions(type="huber")).item() == pytest.approx(expected, rel=1e-5)


def test_flow_min_snr_weight_is_min_snr_gamma_times_sigma_squared():
    flow = FlowMatching(num_train_timesteps=10)
    obj = FlowObjective(flow)
    out, target = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 4, 8])  # sigma 0.1, 0.5, 0.9
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    snr = ((1 - sigma) / sigma) ** 2  # 81, 1, 1/81
    w = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) * sigma**2  # 0.05, 0.25, 0.01/... (x0 error)
    assert w[0].item() == pytest.approx(0.05) and w[1].item() == pytest.approx(0.25)
    assert obj.loss(out, target, t, min_snr_gamma=5.0).item() == pytest.approx(w.mean().item(), rel=1e-6)


def test_debiased_estimation_is_refused_for_flow_with_the_setting_named():
    obj = FlowObjective(FlowMatching())
    with pytest.raises(ValueError, match="debiased_estimation"):
        obj.check(None, LossOptions(debiased_estimation=True))
    with pytest.raises(ValueError, match="prediction_type must be 'flow'"):
        FlowMatching(prediction_type="epsilon")
    with pytest.raises(ValueError, match="weighting"):
        FlowMatching(weighting="logit")
