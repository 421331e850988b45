import torch

from ldm.diffusion.guidance import ClassifierGuidance, Conditioning, classifier_free_guidance
from ldm.diffusion.samplers import ddim, make_timesteps
from ldm.diffusion.schedules import NoiseSchedule


class Recorder:
    """A context-dependent fake model that records each call's batch size."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        return x * 0.5 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 8, generator=g), torch.full((3,), 500.0), torch.randn(3, 7, 16, generator=g)


def test_cfg_is_one_batched_call_with_the_formula():
    x, t, ctx = _inputs()
    uncond = torch.zeros(1, 7, 16)
    m = Recorder()
    out = classifier_free_guidance(m, x, t, Conditioning(ctx, uncond), 7.5)
    assert m.batches == [6]  # one call, batch doubled
    e_c, e_u = m(x, t, ctx), m(x, t, uncond.expand(3, 7, 16))
    torch.testing.assert_close(out, e_u + 7.5 * (e_c - e_u))


def test_scale_one_is_the_conditional_prediction():
    x, t, ctx = _inputs()
    m = Recorder()
    out = classifier_free_guidance(m, x, t, Conditioning(ctx, torch.zeros(1, 7, 16)), 1.0)
    assert m.batches == [3]
    torch.testing.assert_close(out, m(x, t, ctx))


def test_negative_context_changes_result():
    x, t, ctx = _inputs()
    m = Recorder()
    a = classifier_free_guidance(m, x, t, Conditioning(ctx, torch.zeros(1, 7, 16)), 5.0)
    b = classifier_free_guidance(m, x, t, Conditioning(ctx, torch.ones(1, 7, 16)), 5.0)
    assert not torch.allclose(a, b)


def test_classifier_guidance_moves_samples_toward_the_scorer():
    """A scorer preferring bright x0 (log p = mean(x0)) raises the mean of DDIM samples; scale 0 changes nothing."""
    schedule = NoiseSchedule.make("scaled_linear")
    ts = make_timesteps(schedule, 20)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = lambda x, t, c: 0.5 * x  # noqa: E731
    scorer = lambda x0, t: x0.flatten(1).mean(1) * 64  # noqa: E731
    plain = ddim(model, x, schedule, ts)
    zero = ddim(model, x, schedule, ts, classifier=ClassifierGuidance(scorer, scale=0.0))
    pushed = ddim(model, x, schedule, ts, classifier=ClassifierGuidance(scorer, scale=0.5))
    torch.testing.assert_close(zero, plain)
    assert pushed.mean() > plain.mean() + 0.5
