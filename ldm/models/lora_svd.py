"""The linear algebra of the LoRA tools (``python -m ldm.lora``): low-rank factors of weight deltas by SVD, the rank
kept by a kept-energy rule, and exact sums of adapters. Plain tensor functions; no file or command line here.

A layer's delta is a matrix as kohya sd-scripts reshapes it (networks/svd_merge_lora.py, resize_lora.py,
extract_lora_from_models.py): a Linear's (out, in); a Conv2d's (out, in * k * k), so that the rank-r factors become
down (r, in, k, k) = a conv with the layer's kernel and up (out, r, 1, 1) = a 1x1 conv (ldm/models/lora.py).

Eckart-Young: the truncated SVD D_r = U_r S_r V_r^T is the best rank-r approximation of D in the Frobenius norm,
with ||D - D_r||_F^2 = sum_{i>r} s_i^2. The "kept energy" printed by kohya's resize_lora.py ("fro retained") is
||D_r||_F / ||D||_F = sqrt(sum_{i<=r} s_i^2 / sum_i s_i^2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")  # kohya resize_lora.py --dynamic_method
MIN_SV = 1e-6  # kohya resize_lora.py: a largest singular value at most this is a zero delta (kept at rank 1)
WORK_DTYPE = torch.float64  # SVDs in double: full-rank round trips stay within 1e-6 of the input


# ------------------------------------------------------------------------------------------------ shapes

def as_matrix(weight: Tensor) -> Tensor:
    """A layer-shaped delta or up/down factor as the matrix kohya decomposes: (out, in) / (out, in * k * k)."""
    return weight.flatten(1) if weight.ndim > 2 else weight


def to_layer(up: Tensor, down: Tensor, shape: torch.Size | tuple) -> tuple[Tensor, Tensor]:
    """Factors of an (out, in[*k*k]) matrix in the layer's shapes: up (out, r[, 1, 1]), down (r, in[, k, k])."""
    rank = down.shape[0]
    if len(shape) == 4:
        return up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    return up.reshape(shape[0], rank), down.reshape(rank, shape[1])


def product(up: Tensor, down: Tensor) -> Tensor:
    """up @ down as a matrix (the delta of a LoRA at scale 1; a conv LoRA's B A is the same product, kohya
    resize_lora.merge_conv)."""
    return as_matrix(up) @ as_matrix(down)


# ------------------------------------------------------------------------------------------------ SVD

def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U, S (descending), Vh of a dense matrix, computed in double."""
    return torch.linalg.svd(matrix.to(WORK_DTYPE), full_matrices=False)


def svd_of_product(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD of up @ down (out x r times r x in) without forming it: with up = Q_u R_u and down^T = Q_d R_d
    (reduced QR), up @ down = Q_u (R_u R_d^T) Q_d^T, so the SVD of the r x r core W S V^T gives
    U = Q_u W, Vh = V^T Q_d^T. Exact; costs O((out + in) r^2) instead of an SVD of the full delta."""
    up, down = as_matrix(up).to(WORK_DTYPE), as_matrix(down).to(WORK_DTYPE)
    q_u, r_u = torch.linalg.qr(up)
    q_d, r_d = torch.linalg.qr(down.T)
    w, s, vh = torch.linalg.svd(r_u @ r_d.T)
    return q_u @ w, s, vh @ q_d.T


def truncate(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up, down) = (U_r S_r, Vh_r): kohya puts the singular values into up (resize_lora.extract_linear)."""
    return u[:, :rank] * s[:rank], vh[:rank]


def clamp_quantile(up: Tensor, down: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    """kohya extract_lora_from_models.py / svd_merge_lora.py: clamp both factors to +-q, q the `quantile` of all
    their entries (cuts outliers that would overflow fp16; changes the delta, so the error printed includes it)."""
    values = torch.cat([up.flatten(), down.flatten()]).to(WORK_DTYPE)
    # torch.quantile's linear interpolation at q * (n - 1), by kthvalue: torch.quantile refuses over 2**24 entries
    position = quantile * (values.numel() - 1)
    low, frac = int(math.floor(position)), position - math.floor(position)
    hi = values.kthvalue(low + 1).values
    if frac > 0:
        hi = hi + frac * (values.kthvalue(low + 2).values - hi)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


# --------------------------------------------------------------------------------------------- rank choice

def check_rank(rank, what: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{what} must be a positive integer, got {rank!r}")
    return rank


def dynamic_rank(s: Tensor, method: str, value: float) -> int:
    """The rank kohya resize_lora.py keeps for a spectrum `s` (descending) by `--dynamic_method`:

    - sv_ratio: the singular values above s_0 / value;
    - sv_fro: the fewest with sqrt(sum_{i<=r} s_i^2 / sum s_i^2) >= value (kept Frobenius energy);
    - sv_cumulative: the fewest with sum_{i<=r} s_i / sum s_i >= value.
    """
    if method not in DYNAMIC:
        raise ValueError(f"dynamic method must be one of {DYNAMIC}, got {method!r}")
    value = float(value)
    if method == "sv_ratio":
        if value < 1:
            raise ValueError(f"sv_ratio is the largest singular value over the smallest kept: >= 1, got {value}")
        rank = int((s > s[0] / value).sum())
    else:
        if not 0 < value <= 1:
            raise ValueError(f"{method} is the fraction to keep: in (0, 1], got {value}")
        if method == "sv_fro":
            fraction, target = torch.cumsum(s.pow(2), 0) / s.pow(2).sum(), value ** 2
        else:
            fraction, target = torch.cumsum(s, 0) / s.sum(), value
        rank = int((fraction < target - 1e-12).sum()) + 1  # the first index reaching the target, 1-based
    return max(1, min(rank, len(s)))


def choose_rank(s: Tensor, max_rank: int, method: str | None = None, value: float | None = None) -> int:
    """A layer's new rank: `max_rank` (or the dynamic rule's, capped by it), at most the spectrum's length;
    a zero delta keeps rank 1 (as kohya)."""
    if len(s) == 0 or float(s[0]) <= MIN_SV:
        return 1
    rank = dynamic_rank(s, method, value) if method else max_rank
    return max(1, min(rank, max_rank, len(s)))


# --------------------------------------------------------------------------------------------- measures

def kept_energy(s: Tensor, rank: int) -> float:
    """||D_r||_F / ||D||_F = sqrt(sum_{i<=r} s_i^2 / sum s_i^2) (kohya's "fro retained"); 1 for a zero delta."""
    total = float(s.pow(2).sum())
    return 1.0 if total == 0 else math.sqrt(float(s[:rank].pow(2).sum()) / total)


def kept_sum(s: Tensor, rank: int) -> float:
    """sum_{i<=r} s_i / sum s_i (kohya's "sum(S) retained")."""
    total = float(s.sum())
    return 1.0 if total == 0 else float(s[:rank].sum()) / total


def squared_error(target: Tensor, up: Tensor, down: Tensor) -> tuple[float, float]:
    """(||target - up @ down||_F^2, ||target||_F^2) of the matrices: a relative error is sqrt(first / second)."""
    target = as_matrix(target).to(WORK_DTYPE)
    diff = target - product(up.to(WORK_DTYPE), down.to(WORK_DTYPE))
    return float(diff.pow(2).sum()), float(target.pow(2).sum())


def relative(error_sq: float, norm_sq: float) -> float:
    return 0.0 if norm_sq == 0 else math.sqrt(error_sq / norm_sq)


# --------------------------------------------------------------------------------------------- sums

def concat(parts: list[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """An exact sum of LoRAs on one layer: sum_i w_i B_i A_i = [w_1 B_1, ..., w_n B_n] [A_1; ...; A_n], so the
    factors are concatenated along the rank (rank = sum of ranks) and the result has scale 1 (alpha = rank).
    parts: (up, down, weight), weight = multiplier * alpha_i / r_i, in the layer's shapes."""
    ups = [up.to(WORK_DTYPE) * weight for up, _, weight in parts]
    downs = [down.to(WORK_DTYPE) for _, down, _ in parts]
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def lowrank(up: Tensor, down: Tensor, max_rank: int, method: str | None = None, value: float | None = None,
            quantile: float | None = None):
    """up @ down (layer-shaped factors of any rank) re-factored to a chosen rank by SVD.
    -> (up, down) in the layer's shapes, the full spectrum, the rank chosen."""
    u, s, vh = svd_of_product(up, down)
    rank = choose_rank(s, max_rank, method, value)
    new_up, new_down = truncate(u, s, vh, rank)
    if quantile is not None:
        new_up, new_down = clamp_quantile(new_up, new_down, quantile)
    shape = (up.shape[0], *down.shape[1:])
    return (*to_layer(new_up, new_down, shape), s, rank)


def from_delta(delta: Tensor, max_rank: int, quantile: float | None = None):
    """A dense layer-shaped delta (the difference of two models) as rank-`max_rank` factors in the layer's shapes
    (kohya extract_lora_from_models.svd). -> (up, down, full spectrum, rank)."""
    u, s, vh = svd(as_matrix(delta))
    rank = min(max_rank, len(s))
    up, down = truncate(u, s, vh, rank)
    if quantile is not None:
        up, down = clamp_quantile(up, down, quantile)
    return (*to_layer(up, down, delta.shape), s, rank)
