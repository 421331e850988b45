"""What every adapter kind (LoRA, LoHa, LoKr, DoRA) shares: the adapted layer's weight shape and applying a delta
shaped like that weight with the layer's own operation.

LoHa, LoKr and DoRA build their update dW in the layer's weight shape and add op(x, dW) to the layer's output, where
op is the layer's own F.linear / F.conv2d (its stride, padding, dilation), so op(x, W) + op(x, dW) = op(x, W + dW)
and the runtime adapter equals the merged weight (LyCORIS ``LycorisBaseModule`` computes the same ``self.op(x,
delta_weight)`` in its non-bypass forward).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def check_base(base: nn.Module, kind: str) -> None:
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError(f"{kind} on a grouped Conv2d is not supported")
    elif not isinstance(base, nn.Linear):
        raise TypeError(f"{kind} adapts nn.Linear and nn.Conv2d, not {type(base).__name__}")


def weight_shape(base: nn.Module) -> tuple[int, ...]:
    """(out, in) of a Linear, (out, in, kh, kw) of a Conv2d."""
    if isinstance(base, nn.Linear):
        return (base.out_features, base.in_features)
    return (base.out_channels, base.in_channels, *base.kernel_size)


def columns(shape: tuple[int, ...]) -> int:
    """in * kh * kw: the flattened input side of a weight (LyCORIS's 2-D view of a conv kernel)."""
    return math.prod(shape[1:])


def is_spatial(base: nn.Module) -> bool:
    """A kxk conv (k > 1): kohya's conv_dim / conv_alpha apply to it."""
    return isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)


def apply_weight(base: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """op(x, weight) with the base layer's operation and no bias."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation)


def dropped(out: Tensor, p: float, training: bool) -> Tensor:
    """LyCORIS's dropout for the weight-delta kinds (``modules/base.py``: g(x) = W x + drop(dW x))."""
    return F.dropout(out, p=p) if p and training else out


def check_shape(name: str, tensor: Tensor, expected: tuple[int, ...], layer: str) -> None:
    """A file's tensor has the shape the layer needs (checked before anything is built from it)."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{layer}: {name} is {tuple(tensor.shape)}, the layer needs {tuple(expected)}")
