"""A text context as the one (B, L, D) tensor the latent cache stores per caption (ldm.data.latent_cache), and back.

A single encoder's context is such a tensor already. A context with a pooled vector ({"crossattn": (B, L, D),
<pooled key>: (B, P)}, P <= D: SD3's CLIP-L + G (+ T5) tokens and pooled text) is stored as L + 1 rows: the tokens,
then the pooled vector zero-padded to D. Exact both ways (the padding is zeros that are dropped again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pack_rows(tokens: Tensor, pooled: Tensor) -> Tensor:
    """(B, L, D) tokens + (B, P) pooled -> (B, L + 1, D)."""
    if pooled.shape[-1] > tokens.shape[-1]:
        raise ValueError(f"a pooled vector of {pooled.shape[-1]} values does not fit a context row of "
                         f"{tokens.shape[-1]}: this context cannot be cached as rows")
    row = F.pad(pooled.to(tokens.dtype), (0, tokens.shape[-1] - pooled.shape[-1]))
    return torch.cat([tokens, row[:, None]], dim=1)


def unpack_rows(rows: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """(B, L + 1, D) -> the (B, L, D) tokens and the (B, pooled_dim) pooled vector."""
    if rows.ndim != 3 or rows.shape[1] < 2 or pooled_dim > rows.shape[-1]:
        raise ValueError(f"cached context rows of shape {tuple(rows.shape)} do not hold tokens and a pooled vector "
                         f"of {pooled_dim}: rebuild the latent cache for this text encoder")
    return rows[:, :-1], rows[:, -1, :pooled_dim]
