"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
eq. 5):

    W' = m * (W + dW) / ||W + dW||        m: a magnitude per output channel, initialised to ||W||

where dW is another adapter's update (a LoRA's (alpha / r) B A for ``adapter.type=dora``; LyCORIS also decomposes
LoHa / LoKr, which files may hold) and the norm is taken per output channel over the rest of the weight, as PEFT
(``tuners/lora/dora.py``: ``weight.norm(dim=1)``, a conv's over (1, 2, 3)) and LyCORIS's default ``wd_on_out=True``
do. The norm is treated as a constant in the backward pass (the paper's sec. 4.3, as PEFT: ``weight_norm.detach()``;
LyCORIS keeps its gradient), and a float32 epsilon is added to it as LyCORIS and ComfyUI do.

The magnitude is kept in the broadcast shape LyCORIS writes as ``dora_scale``: (out, 1) or (out, 1, 1, 1). Older
LyCORIS files decompose per *input* channel (``wd_on_out=False``: (1, in) or (1, in, 1, 1)); those are read and
applied on that axis (ComfyUI tells the two apart the same way: ``dora_scale.shape[0] == weight.shape[0]``).
The layer gets op(x, W' - W) added, so the runtime adapter equals the merged weight; the network's multiplier k
gives W + k (W' - W) (ComfyUI's strength).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.models.lora_ops import apply_weight, dropped, weight_shape


def magnitude_axis(magnitude_shape: tuple[int, ...], shape: tuple[int, ...], name: str = "layer") -> str:
    """"out" for an (out, 1, ...) magnitude, "in" for a (1, in, ...) one; anything else is an error."""
    ones = (1,) * (len(shape) - 1)
    if tuple(magnitude_shape) == (shape[0], *ones):
        return "out"
    if tuple(magnitude_shape) == (1, shape[1], *ones[1:]):
        return "in"
    raise ValueError(f"{name}: the DoRA magnitude is {tuple(magnitude_shape)}; the layer {tuple(shape)} needs "
                     f"({shape[0]}, {', '.join('1' * (len(shape) - 1))}) (per output channel) or "
                     f"(1, {shape[1]}{', 1' * (len(shape) - 2)}) (per input channel)")


def channel_norm(weight: Tensor, axis: str) -> Tensor:
    """||weight|| per output (or input) channel, in the magnitude's broadcast shape."""
    if axis == "out":
        return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.ndim - 1))
    return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.ndim - 2))


class DoRAModule(nn.Module):
    """A magnitude on top of another adapter module (``adapter``)."""

    def __init__(self, adapter: nn.Module, magnitude: Tensor):
        super().__init__()
        self.adapter = adapter
        self.axis = magnitude_axis(tuple(magnitude.shape), adapter.shape)
        self.magnitude = nn.Parameter(magnitude.detach().clone().float())

    @property
    def algo(self) -> str:
        return "dora" if self.adapter.algo == "lora" else f"{self.adapter.algo}+dora"

    @staticmethod
    def check_magnitude(magnitude: Tensor, base: nn.Module, name: str = "layer") -> None:
        """A file's magnitude fits the layer on one of the two axes (before anything is built from it)."""
        magnitude_axis(tuple(magnitude.shape), weight_shape(base), name)

    @classmethod
    def fresh(cls, base: nn.Module, adapter: nn.Module) -> "DoRAModule":
        """m = ||W|| per output channel (dW = 0 at the start), so W' = W."""
        return cls(adapter, channel_norm(base.weight.detach().float(), "out"))

    # the inner adapter's description (file metadata, network building)
    rank = property(lambda self: self.adapter.rank)
    alpha = property(lambda self: self.adapter.alpha)
    kind = property(lambda self: self.adapter.kind)
    spatial = property(lambda self: self.adapter.spatial)
    dropout = property(lambda self: self.adapter.dropout)

    def weight_delta(self, base_weight: Tensor) -> Tensor:
        """W' - W = m (W + dW) / ||W + dW|| - W, with the norm detached (paper sec. 4.3)."""
        weight = base_weight.to(self.magnitude.dtype)
        combined = weight + self.adapter.weight_delta(weight).reshape(weight.shape)
        norm = channel_norm(combined, self.axis).detach() + torch.finfo(combined.dtype).eps
        return combined * (self.magnitude / norm) - weight

    def delta(self, x: Tensor, base: nn.Module) -> Tensor:
        w = self.weight_delta(base.weight)
        return dropped(apply_weight(base, x.to(w.dtype), w), self.dropout, self.training)

    def parts(self) -> dict[str, Tensor]:
        return {**self.adapter.parts(), "magnitude": self.magnitude.detach()}
