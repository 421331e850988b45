"""FID / KID plumbing (torchmetrics with our extractor): identical image sets score ~0, shifted sets more, and the
further the shift the larger the distance."""

import pytest
import torch

from ldm.evaluation.metrics import build_image_metrics
from tests.helpers.evaluation import SmallExtractor


def _images(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 1.2 - 0.6  # within [-1, 1]


def _fid_kid(real, fake):
    metrics = build_image_metrics(["fid", "kid"], feature_extractor=SmallExtractor(), n_images=len(real),
                                  kid_subset_size=16, kid_subsets=20)
    metrics.update_real(real)
    metrics.mark_real_done()
    metrics.update_generated(fake, [""] * len(fake))
    values = metrics.compute()
    return values["fid"], values["kid"]


def test_identical_sets_give_zero():
    real = _images()
    fid, kid = _fid_kid(real, real.clone())
    assert fid == pytest.approx(0.0, abs=1e-3)
    assert abs(kid) < 1e-3


def test_shifted_sets_give_larger_values_growing_with_the_shift():
    real = _images()
    fid_same, kid_same = _fid_kid(real, _images(seed=1))  # another draw from the same distribution
    fid_small, kid_small = _fid_kid(real, (_images(seed=1) + 0.2).clamp(-1, 1))
    fid_large, kid_large = _fid_kid(real, (_images(seed=1) + 0.5).clamp(-1, 1))
    assert fid_same < fid_small < fid_large
    assert fid_small > 10 * max(fid_same, 1e-3)
    assert kid_same < kid_small < kid_large


def test_real_features_are_kept_across_resets():
    """The validation images are read once per run: later evaluations only add generated images."""
    real = _images()
    metrics = build_image_metrics(["fid"], feature_extractor=SmallExtractor(), n_images=len(real))
    metrics.update_real(real)
    metrics.mark_real_done()
    assert not metrics.needs_real
    metrics.update_generated(real, [""] * len(real))
    first = metrics.compute()["fid"]
    metrics.update_generated((real + 0.3).clamp(-1, 1), [""] * len(real))
    second = metrics.compute()["fid"]
    assert first == pytest.approx(0.0, abs=1e-3) and second > 0.1


def test_fid_and_kid_extract_each_batch_once():
    calls = []

    class Counting(SmallExtractor):
        def forward(self, images):
            calls.append(len(images))
            return super().forward(images)

    real = _images(n=8)
    metrics = build_image_metrics(["fid", "kid"], feature_extractor=Counting(), n_images=8, kid_subset_size=4)
    metrics.update_real(real)
    metrics.mark_real_done()
    metrics.update_generated(real[:4], [""] * 4)
    metrics.update_generated(real[4:], [""] * 4)
    assert calls == [8, 4, 4]
    assert metrics.compute()["fid"] == pytest.approx(0.0, abs=1e-3)


def test_unknown_metric_and_too_few_images():
    with pytest.raises(ValueError, match="unknown metric.*fidd"):
        build_image_metrics(["fidd"])
    metrics = build_image_metrics(["fid", "kid"], feature_extractor=SmallExtractor(), n_images=1)
    assert not metrics and "at least 2 images" in metrics.skipped["fid"]
