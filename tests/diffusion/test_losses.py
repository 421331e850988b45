import pytest
import torch

from ldm.diffusion.losses import diffusion_loss, min_snr_weight, sample_noise, sample_timesteps
from ldm.diffusion.objectives import noised_batch
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


# ---- loss types, Huber thresholds, debiased weighting (closed forms)

from ldm.diffusion.losses import LossOptions, debiased_weight, elementwise_loss, huber_c  # noqa: E402


def _old_default_loss(output, target, schedule, t, gamma):
    """The loss before loss types existed: MSE per sample x min-SNR weight, batch mean."""
    per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * min_snr_weight(schedule, t, gamma)).mean()


def test_default_options_give_the_old_loss_bit_for_bit():
    s = NoiseSchedule.make("scaled_linear")
    g = torch.Generator().manual_seed(3)
    out, target = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    assert torch.equal(diffusion_loss(out, target, s, t, 5.0, LossOptions()), _old_default_loss(out, target, s, t, 5.0))
    assert torch.equal(diffusion_loss(out, target, s, t, 5.0), _old_default_loss(out, target, s, t, 5.0))
    # and noised_batch with the default timestep / noise options draws what it drew before
    x0 = torch.randn(6, 4, 8, 8)
    x_t, tt, tgt = noised_batch(s, x0, 0.1, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t_old = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g) + 0.1 * torch.randn(6, 4, 1, 1, generator=g)
    assert torch.equal(tt, t_old) and torch.equal(tgt, eps)


def test_elementwise_losses_closed_form():
    d = torch.tensor([[-3.0, -0.5, 0.0, 0.01, 2.0]])
    zero = torch.zeros_like(d)
    c = torch.tensor([0.1])
    assert torch.equal(elementwise_loss(d, zero, "l2"), d**2)
    assert torch.equal(elementwise_loss(d, zero, "l1"), d.abs())
    expected = 0.1 * (torch.sqrt(d**2 + 0.01) - 0.1)
    torch.testing.assert_close(elementwise_loss(d, zero, "smooth_l1", c), expected)
    torch.testing.assert_close(elementwise_loss(d, zero, "huber", c), 2 * expected)
    # pseudo-Huber: ~ d^2 for |d| << c, ~ 2c|d| - 2c^2 for |d| >> c
    small = elementwise_loss(torch.tensor([[1e-3]]), torch.zeros(1, 1), "huber", torch.tensor([1.0]))
    assert small.item() == pytest.approx(1e-6, rel=1e-3)
    big = elementwise_loss(torch.tensor([[100.0]]), torch.zeros(1, 1), "huber", torch.tensor([0.1]))
    assert big.item() == pytest.approx(2 * 0.1 * 100 - 2 * 0.01, rel=1e-4)


def test_huber_c_schedules():
    s = NoiseSchedule.make("scaled_linear")
    t = torch.tensor([0, 250, 500, 999])
    const = huber_c(LossOptions(type="huber", huber_c=0.2, huber_schedule="constant"), s, t)
    assert torch.equal(const, torch.full((4,), 0.2))
    expo = huber_c(LossOptions(type="huber", huber_c=0.2, huber_schedule="exponential"), s, t)
    torch.testing.assert_close(expo, torch.exp(-(-torch.log(torch.tensor(0.2, dtype=torch.float64)) / 1000)
                                               * t.double()).float())
    assert expo[0] == 1.0 and expo.diff().lt(0).all()  # 1 at t=0, decaying towards c
    snr = huber_c(LossOptions(type="huber", huber_c=0.2, huber_schedule="snr"), s, t)
    sigma = ((1 - s.alphas_cumprod[t]) / s.alphas_cumprod[t]).sqrt()
    torch.testing.assert_close(snr, ((1 - 0.2) / (1 + sigma) ** 2 + 0.2).float())
    assert snr.diff().lt(0).all() and snr[-1] > 0.2  # ~1 at low noise, -> c at high noise


def test_huber_loss_uses_per_sample_threshold():
    s = NoiseSchedule.make("scaled_linear")
    t = torch.tensor([0, 999])
    out, target = torch.full((2, 1, 2, 2), 0.5), torch.zeros(2, 1, 2, 2)
    opts = LossOptions(type="huber", huber_c=0.1, huber_schedule="snr")
    c = huber_c(opts, s, t)
    expected = (2 * c * (torch.sqrt(0.25 + c**2) - c)).mean()
    torch.testing.assert_close(diffusion_loss(out, target, s, t, options=opts), expected)
    l1 = diffusion_loss(out, target, s, t, options=LossOptions(type="l1"))
    assert l1.item() == pytest.approx(0.5)


def test_debiased_weights():
    t = torch.tensor([0, 100, 500, 999])
    eps = NoiseSchedule.make("scaled_linear")
    snr = eps.snr(t).clamp(max=1000)
    torch.testing.assert_close(debiased_weight(eps, t), (1 / snr.sqrt()).float())
    assert snr[0] == 1000  # the low-noise end is clamped, as kohya does
    v = NoiseSchedule.make("scaled_linear", prediction_type="v_prediction")
    torch.testing.assert_close(debiased_weight(v, t), (1 / (snr + 1)).float())
    out, target = torch.ones(4, 1, 2, 2), torch.zeros(4, 1, 2, 2)
    weighted = diffusion_loss(out, target, eps, t, options=LossOptions(debiased_estimation=True))
    torch.testing.assert_close(weighted, (1 / snr.sqrt()).float().mean())
    both = diffusion_loss(out, target, eps, t, 5.0, LossOptions(debiased_estimation=True))
    torch.testing.assert_close(both, (min_snr_weight(eps, t, 5.0) / snr.sqrt().float()).mean())
    with pytest.raises(ValueError, match="debiased_estimation"):
        debiased_weight(NoiseSchedule.make("scaled_linear", prediction_type="sample"), t)


@pytest.mark.parametrize("bad,match", [({"type": "l3"}, "module.loss.type"),
                                       ({"huber_schedule": "cosine"}, "module.loss.huber_schedule"),
                                       ({"huber_c": 0.0}, "module.loss.huber_c")])
def test_bad_loss_options_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        LossOptions(**bad)
