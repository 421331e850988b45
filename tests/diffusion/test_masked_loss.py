"""Masked loss (kohya-ss/sd-scripts apply_masked_loss: area-resized mask x element-wise loss, no renormalisation)
and DreamBooth's prior-preservation sum, against closed forms on tiny tensors."""

import pytest
import torch

from ldm.diffusion.losses import diffusion_loss, min_snr_weight
from ldm.diffusion.masked_loss import apply_masked_loss, latent_mask
from ldm.diffusion.prior_preservation import prior_preservation_loss
from ldm.diffusion.schedules import NoiseSchedule


def test_area_resize_is_the_block_mean():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)[None, None]
    small = latent_mask(mask, (2, 2))
    torch.testing.assert_close(small, torch.tensor([[[[0.75, 0.0], [0.0, 1.0]]]]))
    # a thin stroke between bilinear's sample points survives area interpolation
    stroke = torch.zeros(1, 1, 8, 8)
    stroke[..., :, 3] = 1.0
    assert latent_mask(stroke, (2, 2))[0, 0, :, 0].tolist() == [0.25, 0.25]
    assert latent_mask(stroke[:, 0], (8, 8)).shape == (1, 1, 8, 8)  # (B, H, W) and no resize
    with pytest.raises(ValueError, match="mask"):
        latent_mask(torch.ones(1, 3, 4, 4), (2, 2))


def test_masked_mse_closed_form():
    out = torch.zeros(2, 2, 2, 2)
    target = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2, :2] = 1.0  # sample 0: only the top-left latent cell counts
    mask[1] = 0.5  # sample 1: everything at half weight
    schedule = NoiseSchedule.make("linear", 10)
    t = torch.tensor([1, 2])
    loss = diffusion_loss(out, target, schedule, t, mask=mask)
    # sample 0: cells (c, 0, 0) = 0 and 4 -> (0 + 16) / 8 elements; sample 1: 0.5 * mean(8^2..15^2); no renormalising
    s0 = (0.0 ** 2 + 4.0 ** 2) / 8
    s1 = 0.5 * sum(v * v for v in range(8, 16)) / 8
    assert float(loss) == pytest.approx((s0 + s1) / 2)
    per = apply_masked_loss((out - target) ** 2, mask)
    assert per.shape == out.shape and float(per[0, 1, 0, 0]) == 16.0 and float(per[0, 1, 1, 1]) == 0.0


def test_all_ones_mask_and_min_snr_match_the_unmasked_loss():
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    schedule = NoiseSchedule.make("scaled_linear", 1000)
    t = torch.tensor([5, 500, 990])
    plain = diffusion_loss(out, target, schedule, t, 5.0)
    assert torch.equal(diffusion_loss(out, target, schedule, t, 5.0, mask=torch.ones(3, 1, 16, 16)), plain)
    masked = diffusion_loss(out, target, schedule, t, 5.0, mask=torch.zeros(3, 1, 16, 16))
    assert float(masked) == 0.0
    w = min_snr_weight(schedule, t, 5.0)
    assert float(plain) == pytest.approx(float((((out - target) ** 2).flatten(1).mean(1) * w).mean()), rel=1e-6)


def test_prior_preservation_is_instance_mean_plus_weighted_class_mean():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])
    is_prior = torch.tensor([False, False, True, True, True])

    def loss_of(rows):
        return per_sample[rows].mean()

    assert float(prior_preservation_loss(loss_of, is_prior, 0.5)) == pytest.approx(2.0 + 0.5 * 20.0)
    assert float(prior_preservation_loss(loss_of, None, 0.5)) == pytest.approx(per_sample.mean())
    assert float(prior_preservation_loss(loss_of, torch.zeros(5, dtype=torch.bool), 0.5)) == pytest.approx(12.8)
    with pytest.raises(ValueError, match="instance"):
        prior_preservation_loss(loss_of, torch.ones(5, dtype=torch.bool), 1.0)


def test_prior_halves_keep_their_own_min_snr_weights():
    """Each row is weighted by the min-SNR weight of its own timestep (kohya train_db.py), in both halves."""
    g = torch.Generator().manual_seed(1)
    out, target = torch.randn(4, 2, 2, 2, generator=g), torch.randn(4, 2, 2, 2, generator=g)
    schedule = NoiseSchedule.make("scaled_linear", 1000)
    t = torch.tensor([10, 900, 20, 800])
    is_prior = torch.tensor([False, False, True, True])
    mse = ((out - target) ** 2).flatten(1).mean(1) * min_snr_weight(schedule, t, 5.0)
    expected = mse[:2].mean() + 2.0 * mse[2:].mean()
    got = prior_preservation_loss(lambda rows: diffusion_loss(out[rows], target[rows], schedule, t[rows], 5.0),
                                  is_prior, 2.0)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
