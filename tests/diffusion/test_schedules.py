import math

import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule, cosine_betas

KINDS = ["linear", "scaled_linear", "cosine"]


@pytest.mark.parametrize("kind", KINDS)
def test_abar_monotone_and_ends_near_zero(kind):
    s = NoiseSchedule.make(kind)
    abar = s.alphas_cumprod
    assert abar.dtype == torch.float64 and len(abar) == 1000
    assert bool((abar[1:] < abar[:-1]).all())
    assert 0 < abar[-1] < 5e-3  # abar_T ~ 0 (SD's scaled_linear ends at 0.0047)
    assert abar[0] > 0.99


def test_known_values():
    lin = NoiseSchedule.make("linear")
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    sd = NoiseSchedule.make("scaled_linear")
    assert sd.betas[0].item() == pytest.approx(0.00085) and sd.betas[-1].item() == pytest.approx(0.012)
    # sqrt(beta) is linear in t for SD's schedule
    root = sd.betas.sqrt()
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(999), atol=1e-12)
    assert sd.alphas_cumprod[-1].item() == pytest.approx(0.0046601, rel=1e-4)


def test_cosine_matches_closed_form_and_is_clipped():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = cosine_betas(T)
    abar = torch.cumprod(1 - betas, 0)
    for t in (0, 10, 500, 900):  # abar_t = f(t+1)/f(0) (eq. (17) with 0-based t) where beta is not clipped
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)


def test_zero_terminal_snr():
    base = NoiseSchedule.make("scaled_linear")
    s = NoiseSchedule.make("scaled_linear", rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    assert s.alphas_cumprod[-1].item() == 0.0
    assert s.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())
    assert torch.isfinite(s.sigmas()).all()
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseSchedule.make("scaled_linear", rescale_zero_terminal_snr=True)


@pytest.mark.parametrize("kind", KINDS)
def test_same_betas_as_diffusers(kind):
    diffusers = pytest.importorskip("diffusers")
    name = {"cosine": "squaredcos_cap_v2"}.get(kind, kind)
    ours = NoiseSchedule.make(kind)
    kw = {} if kind == "cosine" else dict(beta_start=ours.beta_start, beta_end=ours.beta_end)
    ref = diffusers.DDPMScheduler(beta_schedule=name, **kw)
    torch.testing.assert_close(ours.betas.float(), ref.betas, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-4)


def test_zero_snr_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ours = NoiseSchedule.make("scaled_linear", rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  rescale_betas_zero_snr=True)
    # diffusers rescales in float32: betas near the tail (where abar ~ 1e-5) agree to float32 rounding only
    torch.testing.assert_close(ours.betas.float(), ref.betas, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        NoiseSchedule.make("quadratic")
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.make("linear", prediction_type="eps")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseSchedule.make("linear", num_train_timesteps=1)


def test_configurable_T_and_abar_padding():
    s = NoiseSchedule.make("linear", num_train_timesteps=50)
    assert s.num_train_timesteps == 50
    assert s.abar(-1).item() == 1.0
    assert s.abar(torch.tensor([0, 49])).tolist() == s.alphas_cumprod[[0, 49]].tolist()
