import pytest
import torch

from ldm.diffusion.process import output_from_x0_eps, q_sample, training_target, x0_eps_from_output
from ldm.diffusion.schedules import NoiseSchedule


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 10, 500, 999])


def test_q_sample_is_the_closed_form():
    s = NoiseSchedule.make("scaled_linear")
    x0, eps, t = _batch()
    x_t = q_sample(s, x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        abar = s.alphas_cumprod[ti].item()
        torch.testing.assert_close(x_t[i], abar**0.5 * x0[i] + (1 - abar) ** 0.5 * eps[i])


def test_q_sample_statistics():
    """x_t ~ N(sqrt(abar) x0, (1 - abar) I) (the seed's q(x_t | x0))."""
    s = NoiseSchedule.make("linear")
    x0 = torch.full((200_000,), 0.7)
    t = torch.full((200_000,), 300)
    x_t = q_sample(s, x0, t, torch.randn(200_000, generator=torch.Generator().manual_seed(1)))
    abar = s.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(0.7 * abar**0.5, abs=5e-3)
    assert x_t.var().item() == pytest.approx(1 - abar, abs=5e-3)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_target_round_trips(pred):
    s = NoiseSchedule.make("scaled_linear", prediction_type=pred)
    x0, eps, t = _batch()
    t = t.clamp(max=998)
    x_t = q_sample(s, x0, t, eps)
    target = training_target(s, x0, eps, t)
    a, sig = s.abar(t).sqrt(), (1 - s.abar(t)).sqrt()
    x0_hat, eps_hat = x0_eps_from_output(target, x_t, a, sig, pred)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(output_from_x0_eps(x0, eps, a, sig, pred), target, atol=1e-5, rtol=1e-5)


def test_v_definition():
    s = NoiseSchedule.make("linear", prediction_type="v_prediction")
    x0, eps, t = _batch()
    a, sig = s.abar(t).sqrt().float().view(-1, 1, 1, 1), (1 - s.abar(t)).sqrt().float().view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(s, x0, eps, t), a * eps - sig * x0)
