"""Fit a small classifier on real images of a class-captioned folder: the judge of samples in the glyph task and
the benchmarks' own folders (a sample counts as following its prompt when the judge names the prompted class)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


def fit_shift_augmented(make_model: Callable[[], nn.Module], images: torch.Tensor, labels: torch.Tensor,
                        epochs: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Adam + one-cycle lr on cross-entropy, each batch rolled by a random shift of up to 2 px (samples are not
    centred exactly). The model is built by ``make_model`` under ``seed``; the result is in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(images) // batch_size))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for s in range(0, len(images), batch_size):
            idx = order[s:s + batch_size]
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            loss = F.cross_entropy(model(torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
