"""LoHa: the low-rank Hadamard product adapter (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS ``modules/loha.py``).

    dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)      W1a, W2a: (out, r);  W1b, W2b: (r, in * kh * kw)

reshaped to the layer's weight (a conv's kernel is LyCORIS's 2-D view (out, in*kh*kw)); the layer gets
op(x, dW) added (``lora_ops``). The rank of dW is up to r^2 for 4 r (out + in) parameters. Initialised as LyCORIS:
W1b, W2b ~ N(0, 1), W1a ~ N(0, 0.1^2), W2a = 0, so dW = 0 at the start. The tensors carry LyCORIS's names
(``hada_w1_a`` ...), which are the file's (kohya / LyCORIS single file, ComfyUI ``comfy/weight_adapter/loha.py``).

Files may hold a conv's factors CP/Tucker-decomposed (LyCORIS ``use_tucker``): ``hada_t1`` (r, r, kh, kw) with
``hada_w1_a`` (r, out) and ``hada_w1_b`` (r, in), each factor rebuilt as
einsum("i j k l, j r, i p -> p r k l", t1, w1_b, w1_a) (LyCORIS ``functional/loha.py``, ComfyUI's the same). Those
are read and applied; training builds the plain form only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.models.lora_ops import apply_weight, check_base, check_shape, columns, dropped, is_spatial, weight_shape

PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER = ("hada_t1", "hada_t2")


class LoHaModule(nn.Module):
    algo = "loha"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 tucker: bool = False):
        super().__init__()
        check_base(base, "LoHa")
        self.shape, self.rank, self.dropout = weight_shape(base), int(rank), float(dropout)
        self.kind, self.spatial = ("conv" if isinstance(base, nn.Conv2d) else "linear"), is_spatial(base)
        self.tucker = bool(tucker)
        if self.tucker and not self.spatial:
            raise ValueError("a CP/Tucker LoHa (hada_t1 / hada_t2) adapts a kxk conv only")
        out, r = self.shape[0], self.rank
        a_shape, b_shape = ((r, out), (r, self.shape[1])) if self.tucker else ((out, r), (r, columns(self.shape)))
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape))
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *self.shape[2:]))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *self.shape[2:]))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        self.register_buffer("alpha", torch.tensor(float(alpha if alpha else self.rank)))
        nn.init.normal_(self.hada_w1_b, std=1.0)  # LyCORIS LohaModule.__init__
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)

    @classmethod
    def fresh(cls, base: nn.Module, rank: int, alpha: float | None, config) -> "LoHaModule":
        return cls(base, rank, alpha, config.dropout)

    @property
    def scale(self) -> Tensor:
        return self.alpha / self.rank

    def weight_delta(self, base_weight: Tensor | None = None) -> Tensor:
        """(alpha / r) (W1a W1b) ⊙ (W2a W2b) in the layer's weight shape."""
        if self.tucker:
            rebuild = "i j k l, j r, i p -> p r k l"
            hada = (torch.einsum(rebuild, self.hada_t1, self.hada_w1_b, self.hada_w1_a)
                    * torch.einsum(rebuild, self.hada_t2, self.hada_w2_b, self.hada_w2_a))
        else:
            hada = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (hada * self.scale).reshape(self.shape)

    def delta(self, x: Tensor, base: nn.Module) -> Tensor:
        w = self.weight_delta()
        return dropped(apply_weight(base, x.to(w.dtype), w), self.dropout, self.training)

    def parts(self) -> dict[str, Tensor]:
        """The module's tensors by their file names (views: copying into them loads the module)."""
        names = PARTS + (TUCKER if self.tucker else ())
        return {**{k: getattr(self, k).detach() for k in names}, "alpha": self.alpha.detach()}

    @classmethod
    def from_parts(cls, base: nn.Module, parts: dict, name: str = "layer") -> "LoHaModule":
        """A module holding a file's hada_* tensors, each shape checked against the layer first."""
        shape = weight_shape(base)
        rank = int(parts["hada_w1_b"].shape[0]) if parts["hada_w1_b"].ndim == 2 else -1
        tucker = "hada_t1" in parts
        if tucker:
            if len(shape) != 4 or tuple(shape[2:]) == (1, 1):
                raise ValueError(f"{name}: a CP/Tucker LoHa (hada_t1) on a layer that is not a kxk conv")
            expected = {"hada_w1_a": (rank, shape[0]), "hada_w1_b": (rank, shape[1]), "hada_w2_a": (rank, shape[0]),
                        "hada_w2_b": (rank, shape[1]), "hada_t1": (rank, rank, *shape[2:]),
                        "hada_t2": (rank, rank, *shape[2:])}
        else:
            expected = {"hada_w1_a": (shape[0], rank), "hada_w1_b": (rank, columns(shape)),
                        "hada_w2_a": (shape[0], rank), "hada_w2_b": (rank, columns(shape))}
        for key, dims in expected.items():
            check_shape(key, parts[key], dims, name)
        alpha = parts.get("alpha")
        module = cls(base, rank, None if alpha is None else float(alpha), tucker=tucker)
        with torch.no_grad():
            for key in expected:
                getattr(module, key).copy_(parts[key])
        return module
