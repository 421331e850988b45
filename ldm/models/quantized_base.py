"""A frozen base stored quantized, adapters trained on top in full precision (QLoRA: Dettmers et al. 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs", sec. 3: "4-bit NormalFloat" storage, bf16/fp32 computation).

`quantize_base_(module, precision)` replaces every plain ``nn.Linear`` of a frozen network in place by one that
stores its weight as

- ``int8``: bitsandbytes' ``Linear8bitLt`` (LLM.int8(), Dettmers et al. 2022): int8 rows + one absmax scale per
  output row (``SCB``), 1 byte a weight;
- ``nf4``: bitsandbytes' ``Linear4bit`` with the NormalFloat-4 code book and double-quantized block absmax (QLoRA
  eq. 1-3), ~0.5 byte a weight, computed in the input's dtype;
- ``fp8``: ``torch.float8_e4m3fn`` rows + one fp32 scale per output row (absmax / 448, the e4m3 maximum), upcast
  in forward (the "fp8 base" of kohya sd-scripts' ``--fp8_base``), 1 byte a weight.

The modules keep their names and their ``weight`` / ``bias`` parameter names (a key map, an adapter file and the
LoRA hooks see the same layers); the quantization statistics are extra entries beside ``weight``. The 1x1 convs of
SD1's transformer blocks and the 3x3 convs stay in the base's dtype (bitsandbytes quantizes Linear layers only).
Every quantized class is a subclass of ``nn.Linear`` with a ``base_precision`` class attribute, which is how
``ldm.models.lora.is_adaptable`` and `base_precision` recognise them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRECISIONS = ("int8", "nf4", "fp8")
FP8_MAX = 448.0  # largest finite torch.float8_e4m3fn


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency of the [bnb] extra
        raise ImportError("model.quantize_base=int8|nf4 needs bitsandbytes (pip install 'ldm[bnb]')") from e
    return bnb


class DequantizedForward:
    """The forward of every quantized Linear here: its weight dequantized for the product (`frozen_linear`)."""

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self)


def _copy_bias(q: nn.Linear, linear: nn.Linear) -> None:
    """The quantized layer keeps the original's bias as it is, frozen."""
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)


def _int8_class():
    bnb = _bnb()

    class Int8Linear(DequantizedForward, bnb.nn.Linear8bitLt):
        """A frozen Linear stored as LLM.int8()'s row-wise int8 + absmax (bitsandbytes' Int8Params), computed by
        dequantizing (no int8 matmul: the CPU has none, and it is not faster than bf16 on a GPU)."""

        base_precision = "int8"

        @classmethod
        def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
            q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False,
                    threshold=0.0, device="meta")
            # from a host copy: Int8Params quantize when moved off the CPU (or to it) unquantized
            q.weight = bnb.nn.Int8Params(linear.weight.data.float().cpu().contiguous(), requires_grad=False,
                                         has_fp16_weights=False)
            _copy_bias(q, linear)
            return q.to(linear.weight.device)  # Int8Params quantize when moved to a device

        def dequantized_weight(self) -> Tensor:
            scb = self.weight.SCB if self.weight.SCB is not None else self.state.SCB  # a deepcopy keeps state's
            return self.weight.data.float() * (scb.float()[:, None] / 127.0)

    return Int8Linear


def _nf4_class():
    bnb = _bnb()

    class NF4Linear(DequantizedForward, bnb.nn.Linear4bit):
        """A frozen Linear stored as NF4 blocks of 64 with double-quantized absmax (QLoRA's storage)."""

        base_precision = "nf4"

        @classmethod
        def from_linear(cls, linear: nn.Linear) -> "NF4Linear":
            q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    compute_dtype=linear.weight.dtype, quant_type="nf4", compress_statistics=True, device="meta")
            q.weight = bnb.nn.Params4bit(linear.weight.data.cpu().contiguous(), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True)
            _copy_bias(q, linear)
            return q.to(linear.weight.device)  # Params4bit quantize when moved to a device

        def dequantized_weight(self) -> Tensor:
            return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state).float()

    return NF4Linear


class FP8Linear(DequantizedForward, nn.Linear):
    """A frozen Linear stored as float8_e4m3fn rows times an fp32 scale per output row; upcast in forward."""

    base_precision = "fp8"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        if not hasattr(torch, "float8_e4m3fn"):
            raise RuntimeError("model.quantize_base=fp8 needs a torch with torch.float8_e4m3fn (>= 2.1)")
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        w = linear.weight.data.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX  # per output row: absmax -> the e4m3 maximum
        q.weight = nn.Parameter((w / scale[:, None]).to(torch.float8_e4m3fn), requires_grad=False)
        q.register_buffer("weight_scale", scale)
        _copy_bias(q, linear)
        return q

    def dequantized_weight(self) -> Tensor:
        return self.weight.float() * self.weight_scale[:, None]



class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward, never kept: autograd saves the quantized
    layer, not an fp32 copy of its weight (QLoRA sec. 3: "we dequantize the storage data type to the computation
    data type to perform the forward and backward pass"; bitsandbytes' MatMul4Bit does the same). W and b are
    frozen: only the input gets a gradient (the adapters' path)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: nn.Linear) -> Tensor:
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, layer.dequantized_weight().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


def frozen_linear(x: Tensor, layer: nn.Linear) -> Tensor:
    return _DequantizedLinear.apply(x, layer)


def quantized_class(precision: str) -> type:
    if precision == "int8":
        return _INT8()
    if precision == "nf4":
        return _NF4()
    if precision == "fp8":
        return FP8Linear
    raise ValueError(f"model.quantize_base must be null or one of {PRECISIONS}, got {precision!r}")


def _cached(factory):
    made: list[type] = []

    def get() -> type:
        if not made:
            made.append(factory())
        return made[0]

    return get


_INT8, _NF4 = _cached(_int8_class), _cached(_nf4_class)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and hasattr(type(module), "base_precision")


@torch.no_grad()
def quantize_base_(module: nn.Module, precision: str) -> int:
    """Replace every plain nn.Linear under `module` by its `precision` form (in place, same names, frozen);
    returns how many were replaced."""
    cls = quantized_class(precision)
    replaced = 0
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                q = cls.from_linear(child)
                q.requires_grad_(False)
                q.train(child.training)
                setattr(parent, child_name, q)
                replaced += 1
    return replaced


@torch.no_grad()
def dequantize_(module: nn.Module) -> nn.Module:
    """The inverse storage change (for merging adapters into a copy of the base): every quantized Linear under
    `module` becomes a plain fp32 nn.Linear holding its dequantized weight."""
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if is_quantized(child):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.bias.device if child.bias is not None else None)
                plain.weight.copy_(child.dequantized_weight())
                if child.bias is not None:
                    plain.bias.copy_(child.bias.float())
                plain.requires_grad_(False).train(child.training)
                setattr(parent, child_name, plain)
    return module


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def base_precision(module: nn.Module | None) -> str:
    """How a network's weights are stored: "nf4" / "int8" / "fp8" when its Linear layers are quantized, else the
    dtype of its floating-point parameters ("fp32", "bf16", ...)."""
    if module is None:
        return "none"
    kinds = sorted({type(m).base_precision for m in module.modules() if is_quantized(m)})
    if kinds:
        return "+".join(kinds)
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return "+".join(sorted(DTYPE_NAMES.get(d, str(d).replace("torch.", "")) for d in dtypes)) or "none"


def base_precision_metadata(roots: dict[str, nn.Module | None]) -> dict[str, str]:
    """The adapter file's record of the base it was trained on: ``ldm_base_precision`` ("unet=nf4
    text_encoder=nf4"), and kohya sd-scripts' ``ss_fp8_base`` / ``ss_fp8_base_unet`` (train_network.py writes them
    for --fp8_base / --fp8_base_unet)."""
    per_root = {name: base_precision(m) for name, m in roots.items() if m is not None}
    unet_fp8 = per_root.get("unet") == "fp8"
    te_fp8 = per_root.get("text_encoder", "fp8") == "fp8"
    return {"ldm_base_precision": " ".join(f"{k}={v}" for k, v in per_root.items()),
            "ss_fp8_base": str(unet_fp8 and te_fp8), "ss_fp8_base_unet": str(unet_fp8 and not te_fp8)}


def stored_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s state dict: every parameter and buffer, the quantization statistics included (what a
    frozen base holds in memory)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, Tensor))
