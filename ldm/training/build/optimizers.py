"""Optimizers the optim group names that are not in torch itself (optim=adamw8bit).

optim=adamw and optim=adafactor point at torch.optim.AdamW / torch.optim.Adafactor directly."""

from __future__ import annotations

from typing import Iterable

import torch


def adamw8bit(params: Iterable, lr: float = 1e-3, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8,
              min_8bit_size: int = 4096) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): both Adam
    moments stored as 8-bit block-wise quantized tensors (uint8 + one float32 absmax per 256 values). Runs on the
    CPU (bitsandbytes >= 0.48's CPU backend) and on CUDA."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("optim=adamw8bit needs bitsandbytes: pip install -e '.[bnb]' (or pip install "
                          "bitsandbytes; it keeps the installed torch), or choose optim=adamw / optim=adafactor") from e
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                               min_8bit_size=min_8bit_size)
