"""Exponential moving average of the U-Net weights (Polyak averaging), with the usual warm-up of the decay."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

CHUNK_ELEMENTS = 1 << 26  # the update's temporary (weights - average) is made for this many elements at a time


class EMA(nn.Module):
    """A frozen copy of ``model`` whose weights follow ema = decay * ema + (1 - decay) * weights.

    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates (warm-up), so early
    averages are not dominated by the random initialisation. Lives inside the LightningModule, so it is saved in
    every checkpoint and restored on resume like any other weight. The decay and the update count stay on the
    device: an update reads nothing back to the host.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True):  # the averaged copy never trains
        return super().train(False)

    def current_decay(self) -> Tensor:
        """The next update's decay (float64, on the device of the update count)."""
        if not self.warmup:
            return torch.full((), self.decay, dtype=torch.float64, device=self.num_updates.device)
        n = self.num_updates.double()
        return ((1 + n) / (10 + n)).clamp(max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, applied: Tensor | None = None) -> None:
        """ema += (1 - decay) * applied * (weights - ema). ``applied`` (a bool on the device, None: True) is the
        optimizer step's verdict: after a skipped step the average, its buffers and its count stay as they are,
        without the host learning which it was."""
        weight = 1.0 - self.current_decay()
        if applied is not None:
            weight = weight * applied
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        _lerp_(ema_params, params, weight)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b if applied is None else torch.where(applied, b.to(b_ema.dtype), b_ema))
        self.num_updates += 1 if applied is None else applied.long()


def holds_average(modules) -> bool:
    """Whether any of a trained part's modules is an EMA (the weights it averages are then the inference ones)."""
    return any(isinstance(m, EMA) for m in modules)


def _lerp_(averages: list[Tensor], values: list[Tensor], weight: Tensor) -> None:
    """averages += weight * (values - averages) with a tensor weight (torch's _foreach_lerp_ takes a Python number
    only), a chunk of the tensors at a time so that the temporary differences stay small."""
    start = 0
    while start < len(averages):
        end, size = start, 0
        while end < len(averages) and (end == start or size + averages[end].numel() <= CHUNK_ELEMENTS):
            size += averages[end].numel()
            end += 1
        diff = torch._foreach_sub(values[start:end], averages[start:end])
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(averages[start:end], diff)
        start = end
