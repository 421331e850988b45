"""Shared building blocks for the latent-diffusion models.

Parameter names follow the original CompVis `ldm.modules` layout so that
Stable Diffusion single-file checkpoints load without renaming.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000, flip_sin_to_cos=True, freq_shift=0.0):
    """Sinusoidal timestep embedding (Vaswani et al. 2017, sec. 3.5; DDPM appendix B).

    t: (B,) int or float timesteps (fractional allowed). Returns (B, dim) in float32.
    freq_i = max_period ** (-i / (half - freq_shift)); SD uses flip_sin_to_cos=True
    (cos first), freq_shift=0.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2*half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (as in the original `GroupNorm32`)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def normalization(channels, num_groups=32, eps=1e-5):
    """The GroupNorm used throughout SD: 32 groups, eps 1e-5 (1e-6 in the spatial transformer)."""
    return GroupNorm32(num_groups, channels, eps=eps)


class Attention(nn.Module):
    """Multi-head (cross-)attention, `CrossAttention` in the original code.

    Self-attention when context is None. to_q/to_k/to_v have no bias, to_out.0 does.
    Uses F.scaled_dot_product_attention (softmax(QK^T / sqrt(d)) V, Vaswani et al. eq. 1).
    """

    def __init__(self, query_dim, context_dim=None, num_heads=8, head_dim=64, dropout=0.0):
        super().__init__()
        inner = num_heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        # x: (B, N, query_dim), context: (B, L, context_dim) or None
        context = x if context is None else context
        B, N, _ = x.shape
        L = context.shape[1]
        q = self.to_q(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, h*d)
        return self.to_out(out)  # (B, N, query_dim)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer", eq. 5)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)  # (..., dim_out) each
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with GEGLU: net.0 = GEGLU(dim -> mult*dim), net.1 = dropout, net.2 = Linear back to dim."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)
