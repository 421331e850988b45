"""Rotary position embedding over several position axes (Su et al. 2021, RoFormer eq. 34; Flux.1's ``EmbedND``):
each token has an id per axis (Flux: (0, row, column) for image patches, zeros for text tokens), and axis i
rotates its own dims_i features of every head in pairs (2j, 2j + 1) by angle pos_i * theta^(-2j / dims_i).
The frequencies are computed in float64 and applied in float32 (diffusers' ``get_1d_rotary_pos_embed`` with
``repeat_interleave_real=True`` and ``apply_rotary_emb``)."""

from __future__ import annotations

import torch
from torch import Tensor

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (N, head_dim)


def rope_frequencies(ids: Tensor, axes_dims: tuple[int, ...], theta: float = 10000.0) -> Rope:
    """ids (N, n_axes) -> (cos, sin) of shape (N, sum(axes_dims)), each angle repeated for its feature pair."""
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(f"rotary positions: {ids.shape[-1]} id axes for {len(axes_dims)} axis widths {axes_dims}")
    cos, sin = [], []
    for i, dim in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = torch.outer(ids[:, i].to(torch.float64), omega)  # (N, dim / 2)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1).float(), torch.cat(sin, dim=1).float()


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """x (B, heads, N, d) rotated: each pair (x_2j, x_2j+1) -> (x_2j cos - x_2j+1 sin, x_2j+1 cos + x_2j sin)."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)
