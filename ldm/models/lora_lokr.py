"""LoKr: the low-rank Kronecker product adapter (Yeh et al. 2024, "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation"; LyCORIS ``modules/lokr.py``).

    dW = s * W1 ⊗ W2        W1: (a, c);  W2: (b, d[, kh, kw]);  out = a b,  in = c d

reshaped to the layer's weight. W1 is stored whole (``lokr_w1``) or, with ``decompose_both``, as ``lokr_w1_a``
(a, r) @ ``lokr_w1_b`` (r, c); W2 whole (``lokr_w2``) or as ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d*kh*kw).
s = alpha / r when a factor is decomposed, else 1 (LyCORIS forces alpha = r then; ComfyUI
``comfy/weight_adapter/lokr.py`` takes r from w2_b, else w1_b, and uses 1 without either).

Shapes follow LyCORIS's rule (``functional/general.py`` ``factorization`` and ``LokrModule.__init__``):
(a, b) = factorization(out, factor), (c, d) = factorization(in, factor) (a <= b, c <= d; factor=-1 takes the
two closest divisors); W1 is decomposed only with decompose_both and r < max(a, c) / 2; W2 is kept whole when
r >= max(b, d) / 2. Initialisation as LyCORIS: W1 (or its halves) and W2a kaiming-uniform, W2 (or W2b) zeros.
A file's W2 may be CP/Tucker-decomposed on a kxk conv (LyCORIS ``use_tucker``): ``lokr_t2`` (r, r, kh, kw) with
``lokr_w2_a`` (r, b) and ``lokr_w2_b`` (r, d), W2 = einsum("i j k l, j r, i p -> p r k l", t2, w2_b, w2_a) (ComfyUI
``comfy/weight_adapter/lokr.py``); those are read and applied, training builds the plain form only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ldm.models.lora_ops import apply_weight, check_base, check_shape, columns, dropped, is_spatial, weight_shape

PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension, m <= n: m = factor when it divides, else the divisor pair closest to each other
    with m <= factor (LyCORIS ``functional/general.py`` ``factorization``; e.g. 320 -> (16, 20), 128 -> (8, 16),
    128 with factor 4 -> (4, 32), 127 -> (1, 127))."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrModule(nn.Module):
    algo = "lokr"

    def __init__(self, base: nn.Module, a: int, c: int, b: int, d: int, w1_rank: int | None, w2_rank: int | None,
                 alpha: float | None = None, dropout: float = 0.0, tucker: bool = False):
        """The factor shapes given: W1 (a, c) (decomposed at w1_rank), W2 (b, d, ...) (decomposed at w2_rank; with
        `tucker`, through a (r, r, kh, kw) core)."""
        super().__init__()
        check_base(base, "LoKr")
        self.shape, self.dropout = weight_shape(base), float(dropout)
        self.kind, self.spatial = ("conv" if isinstance(base, nn.Conv2d) else "linear"), is_spatial(base)
        if a * b != self.shape[0] or c * d != self.shape[1]:
            raise ValueError(f"LoKr factors ({a}, {c}) x ({b}, {d}) do not make the layer's {self.shape[:2]}")
        kernel = self.shape[2:]
        if w1_rank is None:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, w1_rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(w1_rank, c))
        if w2_rank is None:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        elif tucker:
            if len(kernel) != 2 or tuple(kernel) == (1, 1):
                raise ValueError("a CP/Tucker LoKr (lokr_t2) adapts a kxk conv only")
            self.lokr_w2_a = nn.Parameter(torch.empty(w2_rank, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(w2_rank, d))
            self.lokr_t2 = nn.Parameter(torch.empty(w2_rank, w2_rank, *kernel))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, w2_rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(w2_rank, d * math.prod(kernel)))
        decomposed = w2_rank if w2_rank is not None else w1_rank  # the r of alpha / r (ComfyUI: w2_b's, else w1_b's)
        self.rank = int(decomposed) if decomposed is not None else 1
        # both factors whole: scale 1 (LyCORIS sets alpha = r; ComfyUI ignores alpha)
        self.register_buffer("alpha", torch.tensor(float(alpha if alpha and decomposed is not None else self.rank)))
        for key in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_t2"):
            if hasattr(self, key):
                nn.init.kaiming_uniform_(getattr(self, key), a=math.sqrt(5))
        nn.init.zeros_(self.lokr_w2 if w2_rank is None else self.lokr_w2_b)

    @classmethod
    def fresh(cls, base: nn.Module, rank: int, alpha: float | None, config) -> "LoKrModule":
        """LyCORIS's shapes for `rank`, `config.factor` and `config.decompose_both`."""
        shape = weight_shape(base)
        a, b = factorization(shape[0], config.factor)
        c, d = factorization(shape[1], config.factor)
        w1_rank = rank if config.decompose_both and rank < max(a, c) / 2 else None
        w2_rank = rank if rank < max(b, d) / 2 else None
        return cls(base, a, c, b, d, w1_rank, w2_rank, alpha, config.dropout)

    @property
    def scale(self) -> Tensor:
        return self.alpha / self.rank

    def _w1(self) -> Tensor:
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> Tensor:
        """W2 in LyCORIS's 2-D view (b, d * kh * kw)."""
        if hasattr(self, "lokr_w2"):
            return self.lokr_w2.flatten(1)
        if hasattr(self, "lokr_t2"):
            return torch.einsum("i j k l, j r, i p -> p r k l", self.lokr_t2, self.lokr_w2_b, self.lokr_w2_a).flatten(1)
        return self.lokr_w2_a @ self.lokr_w2_b

    def weight_delta(self, base_weight: Tensor | None = None) -> Tensor:
        """s * W1 ⊗ W2 in the layer's weight shape. The 2-D Kronecker product of W1 (a, c) and W2's (b, d*k*k) view
        puts element (i b + p, j d k k + q k k + t) = W1[i, j] W2[p, q, t], which is the 4-D kernel
        kron(W1[..., None, None], W2) flattened: one product serves Linear and Conv2d."""
        return (torch.kron(self._w1().contiguous(), self._w2().contiguous()) * self.scale).reshape(self.shape)

    def delta(self, x: Tensor, base: nn.Module) -> Tensor:
        w = self.weight_delta()
        return dropped(apply_weight(base, x.to(w.dtype), w), self.dropout, self.training)

    def parts(self) -> dict[str, Tensor]:
        """The module's tensors by their file names (views: copying into them loads the module)."""
        out = {k: getattr(self, k).detach() for k in PARTS if hasattr(self, k)}
        return {**out, "alpha": self.alpha.detach()}

    @classmethod
    def from_parts(cls, base: nn.Module, parts: dict, name: str = "layer") -> "LoKrModule":
        """A module holding a file's lokr_* tensors. Every factor shape is checked against the layer (a b = out,
        c d = in) before anything is allocated."""
        shape = weight_shape(base)
        kernel = math.prod(shape[2:])
        for key in PARTS:
            if key in parts and parts[key].ndim not in (2, 4):
                raise ValueError(f"{name}: {key} has {parts[key].ndim} dimensions")
        if "lokr_w1" in parts:
            (a, c), w1_rank = parts["lokr_w1"].shape[:2], None
        else:
            a, w1_rank = parts["lokr_w1_a"].shape[:2]
            c = parts["lokr_w1_b"].shape[1]
            check_shape("lokr_w1_b", parts["lokr_w1_b"], (w1_rank, c), name)
        if a <= 0 or c <= 0 or shape[0] % a or shape[1] % c:
            raise ValueError(f"{name}: LoKr's first factor ({a}, {c}) does not divide the layer's {shape[:2]}")
        b, d = shape[0] // a, shape[1] // c
        if "lokr_w2" in parts:
            w2 = parts["lokr_w2"]
            if w2.ndim == 4 and len(shape) == 2 and w2.shape[2:] == (1, 1):  # a 1x1 conv's factor on a Linear
                w2 = w2.flatten(1)
            check_shape("lokr_w2", w2, (b, d, *shape[2:]) if w2.ndim == len(shape) else (b, d * kernel), name)
            parts, w2_rank = {**parts, "lokr_w2": w2.reshape(b, d, *shape[2:])}, None
        elif "lokr_t2" in parts:
            w2_rank = parts["lokr_t2"].shape[0]
            if len(shape) != 4 or tuple(shape[2:]) == (1, 1):
                raise ValueError(f"{name}: a CP/Tucker LoKr (lokr_t2) on a layer that is not a kxk conv")
            check_shape("lokr_t2", parts["lokr_t2"], (w2_rank, w2_rank, *shape[2:]), name)
            check_shape("lokr_w2_a", parts["lokr_w2_a"], (w2_rank, b), name)
            check_shape("lokr_w2_b", parts["lokr_w2_b"], (w2_rank, d), name)
        else:
            w2_rank = parts["lokr_w2_a"].shape[1]
            check_shape("lokr_w2_a", parts["lokr_w2_a"], (b, w2_rank), name)
            check_shape("lokr_w2_b", parts["lokr_w2_b"].flatten(1), (w2_rank, d * kernel), name)
        alpha = parts.get("alpha")
        module = cls(base, a, c, b, d, w1_rank, w2_rank, None if alpha is None else float(alpha),
                     tucker="lokr_t2" in parts and "lokr_w2" not in parts)
        with torch.no_grad():
            for key, tensor in module.parts().items():
                if key != "alpha":
                    tensor.copy_(parts[key].reshape(tensor.shape))
        return module
