"""The shapes task's guidance scorer: classifier guidance with the mean-colour scorer moves samples toward the
target colour (on an exact Gaussian denoiser, for every sampler kind), and its gradient flows through the VAE."""

import pytest
import torch
from torch import nn

from ldm.diffusion.guidance import ClassifierGuidance
from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.models.autoencoder import IdentityAutoencoder
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.pipelines import text_to_image
from ldm.tasks.shapes.guidance_scorers import ColorScorer
from tests.helpers.models import bundle, clip_folder  # noqa: F401 - the tiny bundle and CLIP fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianDenoiser(nn.Module):
    """The exact eps prediction for data x0 ~ N(0, sigma_d^2 I): E[eps | x_t] = s x_t / (a^2 sigma_d^2 + s^2).

    A denoiser that behaves like a trained one, so guidance has a predictable direction (random U-Nets do not).
    """

    def __init__(self, schedule, channels=3, sigma_d=0.5):
        super().__init__()
        self.schedule, self.sigma_d = schedule, sigma_d
        self.config = {"in_channels": channels}
        self.downsample_factor = 1
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the pipelines a device and dtype

    def forward(self, x, t, context):
        abar = self.schedule.abar(torch.as_tensor(t).round().long().cpu()).to(x).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x / (abar * self.sigma_d**2 + 1 - abar)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "dpmpp_2m"])
def test_classifier_guidance_moves_the_mean_colour_toward_the_target(clip_folder, sampler):
    schedule = NoiseSchedule.make("scaled_linear")
    bundle = ModelBundle(GaussianDenoiser(schedule), IdentityAutoencoder(3),
                         CLIPTextEncoder.from_pretrained(clip_folder), schedule)
    scorer = ColorScorer(bundle.autoencoder, (0.75, 0.25, 0.25))
    kw = dict(sampler=sampler, steps=10, seed=0, height=8, width=8)
    plain = text_to_image(bundle, ["a"] * 4, **kw)
    zero = text_to_image(bundle, ["a"] * 4, classifier_guidance=ClassifierGuidance(scorer, 0.0), **kw)
    weak = text_to_image(bundle, ["a"] * 4, classifier_guidance=ClassifierGuidance(scorer, 0.3), **kw)
    strong = text_to_image(bundle, ["a"] * 4, classifier_guidance=ClassifierGuidance(scorer, 1.0), **kw)
    torch.testing.assert_close(zero, plain)
    d_plain, d_weak, d_strong = scorer.distance(plain), scorer.distance(weak), scorer.distance(strong)
    assert (d_weak < d_plain).all() and (d_strong < d_weak).all()
    assert (d_strong < 0.75 * d_plain).all()


def test_color_scorer_gradient_flows_through_the_vae(bundle):
    scorer = ColorScorer(bundle.autoencoder, (1.0, 0.0, 0.0))
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    score = scorer(z, torch.zeros(2))
    assert score.shape == (2,) and (score < 0).all()
    (grad,) = torch.autograd.grad(score.sum(), z)
    assert grad.abs().sum() > 0
    guided = text_to_image(bundle, "a", steps=3, height=16, width=16, seed=0,
                           classifier_guidance=ClassifierGuidance(scorer, 100.0))
    assert not torch.equal(guided, text_to_image(bundle, "a", steps=3, height=16, width=16, seed=0))
    with pytest.raises(ValueError, match="target_rgb"):
        ColorScorer(bundle.autoencoder, (2.0, 0.0, 0.0))
