"""Each timestep-sampling option against its closed-form distribution: the empirical P(t <= k) of 200k draws
against the CDF of the noise level u at (k + 1 - lo) / (hi - lo) (t = lo + floor(u (hi - lo)))."""

import math

import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timestep_sampling import TimestepSampling, sample_timesteps

N = 200_000
SCHEDULE = NoiseSchedule.make("scaled_linear", num_train_timesteps=100)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _empirical_vs(cdf, sampling: TimestepSampling, lo: int = 0, hi: int = 100):
    t = sample_timesteps(N, SCHEDULE, "cpu", torch.Generator().manual_seed(0), sampling)
    assert t.dtype == torch.long and t.min() >= lo and t.max() <= hi - 1
    counts = torch.bincount(t - lo, minlength=hi - lo).double().cumsum(0) / N
    for k in range(0, hi - lo - 1, max(1, (hi - lo) // 10)):
        assert counts[k].item() == pytest.approx(cdf((k + 1) / (hi - lo)), abs=0.005), k
    return t


def test_uniform_default_is_randint_and_respects_min_max():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(sample_timesteps(64, SCHEDULE, "cpu", g1), torch.randint(0, 100, (64,), generator=g2))
    _empirical_vs(lambda x: x, TimestepSampling(min_timestep=20, max_timestep=60), 20, 60)


def test_logit_normal_cdf():
    m, s = 0.5, 0.8  # P(u <= x) = Phi((logit(x) - m) / s)  (SD3 eq. (19))
    cdf = lambda x: 1.0 if x >= 1 else _normal_cdf((math.log(x / (1 - x)) - m) / s)  # noqa: E731
    t = _empirical_vs(cdf, TimestepSampling(kind="logit_normal", logit_mean=m, logit_std=s))
    assert t.double().mean() > 50  # a positive mean favours the noisier steps


@pytest.mark.parametrize("scale", [0.0, 1.29, -0.5])
def test_mode_cdf(scale):
    # f_mode(v) is decreasing from 1 to 0, so P(f(V) <= x) = 1 - f^{-1}(x); f^{-1} by bisection
    f = lambda v: 1 - v - scale * (math.cos(math.pi * v / 2) ** 2 - 1 + v)  # noqa: E731

    def cdf(x):
        a, b = 0.0, 1.0
        for _ in range(60):
            mid = (a + b) / 2
            a, b = (mid, b) if f(mid) > x else (a, mid)
        return 1 - a

    _empirical_vs(cdf, TimestepSampling(kind="mode", mode_scale=scale))


def test_cosmap_cdf_with_bounds():
    # u = 1 - 1 / (tan(pi v / 2) + 1) is increasing, so P(u <= x) = (2 / pi) atan(x / (1 - x))  (SD3 eq. (21))
    cdf = lambda x: 1.0 if x >= 1 else 2 / math.pi * math.atan(x / (1 - x))  # noqa: E731
    _empirical_vs(cdf, TimestepSampling(kind="cosmap", min_timestep=10, max_timestep=90), 10, 90)


@pytest.mark.parametrize("bad,match", [({"kind": "beta"}, "module.timesteps.kind"),
                                       ({"logit_std": 0.0}, "logit_std"), ({"mode_scale": 2.0}, "mode_scale"),
                                       ({"min_timestep": 50, "max_timestep": 50}, "max_timestep"),
                                       ({"min_timestep": -1}, "min_timestep")])
def test_bad_options_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        TimestepSampling(**bad)


def test_max_timestep_beyond_the_schedule_is_refused():
    with pytest.raises(ValueError, match="max_timestep=101"):
        sample_timesteps(4, SCHEDULE, "cpu", sampling=TimestepSampling(max_timestep=101))
