import pytest
import torch

from ldm.diffusion.losses import diffusion_loss, min_snr_weight, noised_batch, sample_noise, sample_timesteps
from ldm.diffusion.schedules import NoiseSchedule


def test_timesteps_uniform_over_all_steps():
    s = NoiseSchedule.make("linear", num_train_timesteps=10)
    t = sample_timesteps(50_000, s, "cpu", torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10).float()
    assert t.min() == 0 and t.max() == 9
    assert (counts / 50_000 - 0.1).abs().max() < 0.01


def test_perfect_prediction_has_zero_loss_and_target_is_noise():
    s = NoiseSchedule.make("scaled_linear")
    x0 = torch.randn(8, 4, 4, 4)
    g = torch.Generator().manual_seed(0)
    x_t, t, target = noised_batch(s, x0, generator=g)
    g = torch.Generator().manual_seed(0)
    sample_timesteps(8, s, "cpu", g)
    assert torch.equal(target, sample_noise(x0, generator=g))  # eps-prediction: target = eps
    assert diffusion_loss(target, target, s, t).item() == 0.0
    assert diffusion_loss(target + 1, target, s, t).item() == pytest.approx(1.0)


def test_min_snr_weights():
    eps = NoiseSchedule.make("scaled_linear")
    t = torch.tensor([0, 100, 500, 999])
    snr = eps.snr(t)
    w = min_snr_weight(eps, t, gamma=5.0)
    torch.testing.assert_close(w, (snr.clamp(max=5.0) / snr).float())
    assert w[-1] == 1.0 and w[0] < 1.0  # low-noise steps are down-weighted
    v = NoiseSchedule.make("scaled_linear", prediction_type="v_prediction")
    torch.testing.assert_close(min_snr_weight(v, t, 5.0), (snr.clamp(max=5.0) / (snr + 1)).float())


def test_offset_noise_shifts_channel_means():
    x0 = torch.zeros(256, 3, 16, 16)
    plain = sample_noise(x0, 0.0, torch.Generator().manual_seed(0))
    off = sample_noise(x0, 0.5, torch.Generator().manual_seed(0))
    assert plain.mean(dim=(2, 3)).std() < 0.1
    assert off.mean(dim=(2, 3)).std() > 0.4
