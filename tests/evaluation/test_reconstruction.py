"""The VAE check's numbers against closed forms, and the warning that names the fix."""

import math

import pytest
import torch

from ldm.evaluation.reconstruction import check_autoencoder, compare


def test_psnr_and_colour_shift_closed_form():
    x = torch.rand(4, 3, 8, 8) * 1.6 - 0.8
    same = compare(x, x.clone())
    assert same.colour_shift == 0 and same.psnr_db > 90 and not same.poor
    # +0.1 on the red channel only, in [-1, 1]: 0.05 in [0, 1] -> MSE 0.05^2 / 3, shift 0.05 * 255
    y = x.clone()
    y[:, 0] += 0.1
    r = compare(x, y)
    assert r.psnr_db == pytest.approx(10 * math.log10(3 / 0.05 ** 2), abs=1e-3)
    assert r.colour_shift == pytest.approx(0.05 * 255, rel=1e-4) and r.max_colour_shift == pytest.approx(12.75, rel=1e-4)
    assert r.poor  # 12.75/255 > 8/255


def test_identity_first_stage_is_perfect_and_a_fresh_vae_is_poor():
    from ldm.models.autoencoder import AutoencoderKL, IdentityAutoencoder

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    r = check_autoencoder(IdentityAutoencoder(scaling_factor=0.5), x)
    assert r.colour_shift < 1e-3 and r.psnr_db > 60 and not r.poor
    torch.manual_seed(0)
    assert check_autoencoder(AutoencoderKL.from_preset("tiny").eval(), x).poor
