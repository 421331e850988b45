"""The LoRA tools' linear algebra (ldm/models/lora_svd.py) against closed forms: the SVD of a product equals the
dense SVD, truncation is Eckart-Young (error^2 = sum of the dropped s_i^2), kohya's dynamic rank rules, exact sums
by concatenation, and conv deltas in kohya's (out, in*k*k) layout."""

import math

import pytest
import torch

from ldm.models import lora_svd


def factors(out, rank, inner, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g), torch.randn(rank, inner, generator=g)


def test_svd_of_a_product_equals_the_dense_svd():
    up, down = factors(12, 5, 9)
    u, s, vh = lora_svd.svd_of_product(up, down)
    dense = torch.linalg.svd((up @ down).double()).S
    assert torch.allclose(s, dense[:5], atol=1e-10)
    assert torch.allclose((u * s) @ vh, (up @ down).double(), atol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_truncation_error_is_the_dropped_energy(rank):
    up, down = factors(10, 5, 8, seed=1)
    new_up, new_down, s, kept_rank = lora_svd.lowrank(up, down, rank)
    assert kept_rank == rank and new_up.shape == (10, rank) and new_down.shape == (rank, 8)
    err, norm = lora_svd.squared_error(up.double() @ down.double(), new_up, new_down)
    assert err == pytest.approx(float(s[rank:].pow(2).sum()), rel=1e-8, abs=1e-9)  # Eckart-Young
    assert lora_svd.kept_energy(s, rank) == pytest.approx(math.sqrt(1 - err / norm), abs=1e-9)


def test_conv_deltas_use_kohyas_layout_and_round_trip():
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(6, 3, 1, 1, generator=g), torch.randn(3, 4, 3, 3, generator=g)
    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)  # LoRAModule.weight_delta of a 3x3 conv
    assert torch.allclose(lora_svd.product(up, down).reshape(delta.shape), delta, atol=1e-6)
    new_up, new_down, s, rank = lora_svd.from_delta(delta, 8)
    assert rank == 6 and new_up.shape == (6, 6, 1, 1) and new_down.shape == (6, 4, 3, 3)  # min(out, in*k*k)
    again = torch.einsum("or,rikl->oikl", new_up[:, :, 0, 0], new_down)
    assert torch.allclose(again.float(), delta, atol=1e-5)
    assert int((s > 1e-4 * s[0]).sum()) == 3  # a rank-3 delta (float32 rounding below)


def test_concat_is_the_exact_weighted_sum():
    a_up, a_down = factors(7, 2, 5, seed=3)
    b_up, b_down = factors(7, 3, 5, seed=4)
    up, down = lora_svd.concat([(a_up, a_down, 0.7), (b_up, b_down, -0.5)])
    assert up.shape == (7, 5) and down.shape == (5, 5)
    want = 0.7 * a_up @ a_down - 0.5 * b_up @ b_down
    assert torch.allclose((up @ down).float(), want, atol=1e-6)


def test_dynamic_rank_rules_as_kohya():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert lora_svd.dynamic_rank(s, "sv_ratio", 5.0) == 3  # values above 8 / 5 = 1.6
    assert lora_svd.dynamic_rank(s, "sv_ratio", 1.0) == 1
    energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()  # 64/85.25, 80/85.25, 84/85.25, ...
    assert lora_svd.dynamic_rank(s, "sv_fro", math.sqrt(float(energy[1]))) == 2  # reached exactly at rank 2
    assert lora_svd.dynamic_rank(s, "sv_fro", 0.99) == 3
    assert lora_svd.dynamic_rank(s, "sv_cumulative", 12 / 15.5) == 2
    assert lora_svd.dynamic_rank(s, "sv_cumulative", 1.0) == 5
    assert lora_svd.choose_rank(s, 2, "sv_cumulative", 1.0) == 2  # capped by the rank
    assert lora_svd.choose_rank(torch.zeros(4, dtype=torch.float64), 3) == 1  # a zero delta keeps rank 1
    for method, value in (("sv_ratio", 0.5), ("sv_fro", 1.5), ("sv_cumulative", 0.0), ("nope", 1.0)):
        with pytest.raises(ValueError):
            lora_svd.dynamic_rank(s, method, value)


def test_clamp_quantile_bounds_both_factors():
    up, down = factors(30, 4, 30, seed=5)
    up[0, 0] = 100.0
    c_up, c_down = lora_svd.clamp_quantile(up.double(), down.double(), 0.99)
    hi = float(torch.cat([up.flatten(), down.flatten()]).double().quantile(0.99))
    assert float(c_up.max()) == pytest.approx(hi, abs=1e-12) and float(c_up[0, 0]) == pytest.approx(hi, abs=1e-12)
    assert float(c_down.abs().max()) <= hi + 1e-12 and float(c_up.min()) >= -hi - 1e-12


def test_rank_must_be_positive():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            lora_svd.check_rank(bad)
