"""Learning-rate schedules as LambdaLR partials: linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SHAPES = ("constant", "cosine")


def warmup_then(optimizer: Optimizer, warmup_steps: int = 0, schedule: str = "constant",
                total_steps: int | None = None, min_factor: float = 0.0) -> LambdaLR:
    """factor(step) = step / warmup for step < warmup; then 1 (constant) or a cosine from 1 down to min_factor
    at total_steps (Loshchilov & Hutter 2017)."""
    if schedule not in SHAPES:
        raise ValueError(f"lr_scheduler.schedule must be one of {SHAPES}, got {schedule!r}")
    if schedule == "cosine" and not total_steps:
        raise ValueError("lr_scheduler.total_steps is required for the cosine schedule")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
