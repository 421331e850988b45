"""LoHa: the low-rank Hadamard product adapter (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS ``modules/loha.py``).

    dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)      W1a, W2a: (out, r);  W1b, W2b: (r, in * kh * kw)

reshaped to the layer's weight (a conv's kernel is LyCORIS's 2-D view (out, in*kh*kw)); the layer gets
op(x, dW) added (``lora_ops``). The rank of dW is up to r^2 for 4 r (out + in) parameters. Initialised as LyCORIS:
W1b, W2b ~ N(0, 1), W1a ~ N(0, 0.1^2), W2a = 0, so dW = 0 at the start. The tensors carry LyCORIS's names
(``hada_w1_a`` ...), which are the file's (kohya / LyCORIS single file, ComfyUI ``comfy/weight_adapter/loha.py``).
CP/Tucker-decomposed convs (``hada_t1`` / ``hada_t2``) are not built or read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.models.lora_ops import apply_weight, check_base, check_shape, columns, dropped, is_spatial, weight_shape

PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaModule(nn.Module):
    algo = "loha"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        check_base(base, "LoHa")
        self.shape, self.rank, self.dropout = weight_shape(base), int(rank), float(dropout)
        self.kind, self.spatial = ("conv" if isinstance(base, nn.Conv2d) else "linear"), is_spatial(base)
        out, cols = self.shape[0], columns(self.shape)
        self.hada_w1_a = nn.Parameter(torch.empty(out, self.rank))
        self.hada_w1_b = nn.Parameter(torch.empty(self.rank, cols))
        self.hada_w2_a = nn.Parameter(torch.empty(out, self.rank))
        self.hada_w2_b = nn.Parameter(torch.empty(self.rank, cols))
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
        hada = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (hada * self.scale).reshape(self.shape)

    def delta(self, x: Tensor, base: nn.Module) -> Tensor:
        w = self.weight_delta()
        return dropped(apply_weight(base, x.to(w.dtype), w), self.dropout, self.training)

    def parts(self) -> dict[str, Tensor]:
        """The module's tensors by their file names (views: copying into them loads the module)."""
        return {**{k: getattr(self, k).detach() for k in PARTS}, "alpha": self.alpha.detach()}

    @classmethod
    def from_parts(cls, base: nn.Module, parts: dict, name: str = "layer") -> "LoHaModule":
        """A module holding a file's hada_* tensors, each shape checked against the layer first."""
        shape = weight_shape(base)
        rank = int(parts["hada_w1_b"].shape[0]) if parts["hada_w1_b"].ndim == 2 else -1
        for key, expected in (("hada_w1_a", (shape[0], rank)), ("hada_w1_b", (rank, columns(shape))),
                              ("hada_w2_a", (shape[0], rank)), ("hada_w2_b", (rank, columns(shape)))):
            check_shape(key, parts[key], expected, name)
        alpha = parts.get("alpha")
        module = cls(base, rank, None if alpha is None else float(alpha))
        with torch.no_grad():
            for key in PARTS:
                getattr(module, key).copy_(parts[key])
        return module
