"""Noise options: pyramid (multi-resolution) noise and input perturbation against closed forms."""

import pytest
import torch

from ldm.diffusion.objectives import noised_batch
from ldm.diffusion.noise import NoiseOptions, perturbed_noise, pyramid_noise, sample_noise
from ldm.diffusion.process import q_sample, signal_noise
from ldm.diffusion.schedules import NoiseSchedule


def test_pyramid_off_is_identity_and_on_is_unit_std_low_frequency():
    noise = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    assert pyramid_noise(noise, 0, 0.3) is noise
    out = pyramid_noise(noise, 6, 0.8, torch.Generator().manual_seed(1))
    assert out.shape == noise.shape and out.dtype == noise.dtype
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)  # the sum is rescaled to unit std
    # white noise: the per-(sample, channel) spatial mean has variance 1 / (h w); coarse levels raise it
    white = noise.mean(dim=(2, 3)).var().item()
    assert white == pytest.approx(1 / 1024, rel=0.15)
    assert out.mean(dim=(2, 3)).var().item() > 20 * white
    # and neighbouring pixels become correlated (white noise: ~0)
    corr = lambda x: torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]  # noqa: E731
    assert abs(corr(noise)) < 0.01 and corr(out) > 0.2


def test_pyramid_level_zero_alone_is_white():
    # one iteration adds a full-size N(0, I) (level 0, weight discount^0 = 1): (eps + eps') / std stays white
    noise = torch.randn(256, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pyramid_noise(noise, 1, 0.3, torch.Generator().manual_seed(2))
    assert out.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 256, rel=0.15)
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)


def test_input_perturbation_changes_x_t_not_the_target():
    s = NoiseSchedule.make("scaled_linear")
    x0 = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    gamma = 0.1
    x_t, t, target = noised_batch(s, x0, generator=torch.Generator().manual_seed(5),
                                  noise_options=NoiseOptions(ip_noise_gamma=gamma))
    plain_x_t, plain_t, plain_target = noised_batch(s, x0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(t, plain_t) and torch.equal(target, plain_target)  # target = eps, the same draws
    # x_t = a x0 + s (eps + gamma xi): (x_t - q_sample(x0, eps)) / s_t = gamma xi, xi ~ N(0, I)
    _, sig = signal_noise(s, t)
    xi = (x_t - q_sample(s, x0, t, target)) / sig.float().view(-1, 1, 1, 1)
    assert xi.std().item() == pytest.approx(gamma, rel=0.02)
    assert xi.mean().abs().item() < 0.005
    assert perturbed_noise(target, 0.0) is target


def test_offset_noise_unchanged():
    x0 = torch.zeros(256, 3, 16, 16)
    off = sample_noise(x0, 0.5, torch.Generator().manual_seed(0))
    assert off.mean(dim=(2, 3)).std() > 0.4


@pytest.mark.parametrize("bad,match", [({"pyramid_iterations": -1}, "pyramid_iterations"),
                                       ({"pyramid_discount": 1.5}, "pyramid_discount"),
                                       ({"ip_noise_gamma": -0.1}, "ip_noise_gamma")])
def test_bad_noise_options_name_the_key(bad, match):
    with pytest.raises(ValueError, match=f"module.noise.{match}"):
        NoiseOptions(**bad)
