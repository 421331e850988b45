"""Low-rank adapters: LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on Linear layers
and its convolutional form ("LoCon", kohya sd-scripts `networks/lora.py`) on Conv2d layers; the network that holds
them also holds the other kinds `adapter.type` names, each in its own file: LoHa (lora_loha.py), LoKr
(lora_lokr.py) and DoRA (lora_dora.py). Every kind has delta(x, base) (what the layer's output gets added),
weight_delta(W) (the same as a weight: merging), parts() / from_parts() (its tensors by their file names).

For a frozen layer W the adapted layer computes (Hu et al. eq. 3, with the alpha/r scaling of their sec. 4.1)

    h = W x + (alpha / r) * B (A x)        A: down, (r, in[, k, k]);  B: up, (out, r[, 1, 1])

A is kaiming-uniform initialised and B zeros, so the adapted model starts equal to the base. On a Conv2d the
down projection is a conv with the base's kernel, stride and padding and the up projection a 1x1 conv, so
B (A * x) = (B A) * x and the adapter merges exactly into the base kernel (`weight_delta`).

The adapters live in a `LoRANetwork`, apart from the networks they adapt: the base modules keep their parameter
names (checkpoints, exports and key maps are untouched) and the adapter is added to their output by a forward
hook. Only the network's parameters train; its state dict is the trainable checkpoint.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.lora_ops import is_spatial, weight_shape

PRESETS = ("attention", "attention_ff", "full")
TYPES = ("lora", "loha", "lokr", "dora")
# A rank above a layer's narrower side adds nothing (SD's and SDXL's layers are at most 1280 on it); a stored
# config's rank sizes the adapter's tensors, so it is bounded.
MAX_RANK = 4096
ROOTS = ("unet", "text_encoder")
KEY_PREFIX = {"unet": "unet", "text_encoder": "te"}


@dataclass
class LoRAConfig:
    """What `adapter=lora` (and loha / lokr / dora) trains (configs/adapter/lora.yaml). alpha=None means
    alpha = rank (scale 1)."""

    type: str = "lora"  # lora | loha | lokr | dora
    preset: str = "attention"  # attention | attention_ff | full (LoCon)
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0  # on the rank-r activations, as kohya's `network_dropout`
    conv_rank: int | None = None  # `full`: rank of the 3x3 convs (None: rank)
    conv_alpha: float | None = None  # `full`: alpha of the 3x3 convs (None: conv_rank)
    text_encoder: bool = False  # also adapt the text encoder's attention and MLP
    unet_lr: float | None = None  # None: optim.lr
    text_encoder_lr: float | None = None  # None: the U-Net adapter's lr
    init_from: str | None = None  # a LoRA file (ours, kohya's, diffusers') to start from
    factor: int = -1  # LoKr: the Kronecker factor's size (-1: the two closest divisors, LyCORIS's default)
    decompose_both: bool = False  # LoKr: also split the smaller factor into two rank-r halves

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"adapter.type must be one of {TYPES}, got {self.type!r}")
        if not (int(self.factor) == -1 or 0 < int(self.factor) <= MAX_RANK):
            raise ValueError(f"adapter.factor must be -1 or an integer in [1, {MAX_RANK}], got {self.factor!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"adapter.preset must be one of {PRESETS}, got {self.preset!r}")
        for key in ("rank", "conv_rank"):
            value = getattr(self, key)
            if value is not None and not 0 < int(value) <= MAX_RANK:
                raise ValueError(f"adapter.{key} must be an integer in [1, {MAX_RANK}], got {value!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")
        for key in ("alpha", "conv_alpha", "unet_lr", "text_encoder_lr"):
            value = getattr(self, key)
            if value is not None and float(value) <= 0:
                raise ValueError(f"adapter.{key} must be positive (or null), got {value!r}")


# ----------------------------------------------------------------------------------------------------- targets

def is_adaptable(module: nn.Module) -> bool:
    quantized = isinstance(module, nn.Linear) and hasattr(type(module), "base_precision")  # ldm.models.quantized_base
    return type(module) is nn.Linear or quantized or (type(module) is nn.Conv2d and module.groups == 1)


def unet_targets(unet: nn.Module, preset: str) -> dict[str, nn.Module]:
    """Module paths (our / original SD names) of the U-Net layers a preset adapts.

    - attention: to_q, to_k, to_v, to_out.0 of every (cross-)attention (diffusers' train_text_to_image_lora.py)
    - attention_ff: every Linear / 1x1 conv of the SpatialTransformers (kohya's default
      UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]: + proj_in, proj_out, ff.net.0.proj, ff.net.2)
    - full: + every Linear / Conv2d of the ResBlocks, Downsamples and Upsamples (kohya's
      UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]: LoCon)
    """
    from ldm.models.layers import Attention
    from ldm.models.unet import Downsample, ResBlock, SpatialTransformer, Upsample

    if preset not in PRESETS:
        raise ValueError(f"adapter.preset must be one of {PRESETS}, got {preset!r}")
    if hasattr(unet, "lora_targets"):  # a denoiser that names its own (the MMDiT)
        return unet.lora_targets(preset)
    containers: tuple[type, ...] = (Attention,)
    if preset in ("attention_ff", "full"):
        containers = (SpatialTransformer,)
    if preset == "full":
        containers += (ResBlock, Downsample, Upsample)
    out: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, containers):
            continue
        for child_name, child in module.named_modules():
            if not child_name or not is_adaptable(child):
                continue
            if isinstance(module, Attention) and child_name not in ("to_q", "to_k", "to_v", "to_out.0"):
                continue
            out[f"{name}.{child_name}"] = child
    return out


def text_encoder_targets(text_encoder: nn.Module) -> dict[str, nn.Module]:
    """The text encoder's self-attention q/k/v/out projections and MLP fc1/fc2 (kohya's
    TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"])."""
    out = {}
    for name, module in text_encoder.named_modules():
        if type(module).__name__ in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
            for child_name, child in module.named_children():
                if is_adaptable(child):
                    out[f"{name}.{child_name}"] = child
    return out


def module_key(root: str, path: str) -> str:
    """The adapter's name in the network (a ModuleDict key: no dots): `unet_input_blocks_1_1_..._to_q`."""
    return f"{KEY_PREFIX[root]}_{path.replace('.', '_')}"


# ----------------------------------------------------------------------------------------------------- modules

class LoRAModule(nn.Module):
    """down (A) and up (B) of one adapted layer, its alpha (a buffer, saved like kohya's `.alpha`) and dropout."""

    algo = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        rank = int(rank)
        if isinstance(base, nn.Linear):
            self.kind = "linear"
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("LoRA on a grouped Conv2d is not supported")
            self.kind = "conv"
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA adapts nn.Linear and nn.Conv2d, not {type(base).__name__}")
        self.rank, self.shape, self.spatial = rank, weight_shape(base), is_spatial(base)
        self.register_buffer("alpha", torch.tensor(float(alpha if alpha else rank)))
        self.dropout = float(dropout)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # as nn.Linear's default / Microsoft's loralib
        nn.init.zeros_(self.up.weight)

    @classmethod
    def fresh(cls, base: nn.Module, rank: int, alpha: float | None, config: LoRAConfig) -> "LoRAModule":
        return cls(base, rank, alpha, config.dropout)

    @property
    def scale(self) -> Tensor:
        """alpha / r as a tensor on the adapter's device: a Python number would be read from the device at every
        forward (a host sync on a GPU, a graph break under torch.compile)."""
        return self.alpha / self.rank

    def delta(self, x: Tensor, base: nn.Module | None = None) -> Tensor:
        """(alpha / r) * B(dropout(A x)), computed in the adapter's dtype (the base layer is not needed)."""
        h = self.down(x.to(self.down.weight.dtype))
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout)
        return self.up(h) * self.scale

    def weight_delta(self, base_weight: Tensor | None = None) -> Tensor:
        """(alpha / r) * B A in the base weight's shape: merged W' = W + multiplier * weight_delta()."""
        up, down = self.up.weight, self.down.weight
        if self.kind == "linear":
            return (up @ down) * self.scale  # (out, in)
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * self.scale  # (out, in, k, k)

    def parts(self) -> dict[str, Tensor]:
        """down / up / alpha (views: copying into them loads the module)."""
        return {"down": self.down.weight.detach(), "up": self.up.weight.detach(), "alpha": self.alpha.detach()}

    @classmethod
    def from_parts(cls, base: nn.Module, parts: dict, name: str = "layer") -> "LoRAModule":
        """A module holding given down / up (shaped as our Linear / Conv2d weights) and alpha (None: rank)."""
        down, up = parts["down"], parts["up"]
        if down.ndim not in (2, 4):
            raise ValueError(f"LoRA weights for {name}: down {tuple(down.shape)} is not a layer weight")
        with torch.device("meta"):  # the expected shapes, without allocating
            probe = cls(base, down.shape[0])
        if probe.down.weight.shape != down.shape or probe.up.weight.shape != up.shape:
            raise ValueError(f"LoRA weights for {name}: down {tuple(down.shape)} / up {tuple(up.shape)} "
                             f"do not fit the layer (expected {tuple(probe.down.weight.shape)} / "
                             f"{tuple(probe.up.weight.shape)})")
        alpha = parts.get("alpha")
        lora = cls(base, down.shape[0], None if alpha is None else float(alpha))
        with torch.no_grad():
            lora.down.weight.copy_(down)
            lora.up.weight.copy_(up)
        return lora


def adapter_kind(parts: dict) -> str:
    """The kind of adapter a layer's parts (``LoRANetwork.weights()``, ``LoRAFile.weights``) hold: "lora"
    (down / up / alpha), "loha" (hada_*), "lokr" (lokr_*); with a "magnitude" (DoRA) "dora" (a LoRA's) or
    "loha+dora" / "lokr+dora"."""
    inner = "loha" if "hada_w1_a" in parts else "lokr" if any(k.startswith("lokr_") for k in parts) else "lora"
    if "magnitude" not in parts:
        return inner
    return "dora" if inner == "lora" else f"{inner}+dora"


def _module_classes() -> dict[str, type]:
    from ldm.models.lora_dora import DoRAModule
    from ldm.models.lora_loha import LoHaModule
    from ldm.models.lora_lokr import LoKrModule

    return {"lora": LoRAModule, "loha": LoHaModule, "lokr": LoKrModule, "dora": DoRAModule}


def module_from_parts(base: nn.Module, parts: dict, name: str = "layer") -> nn.Module:
    """The adapter module of the kind `parts` hold, filled with them; every shape is checked against `base`."""
    kinds = _module_classes()
    if parts.get("magnitude") is None:
        return kinds[adapter_kind(parts)].from_parts(base, parts, name)
    kinds["dora"].check_magnitude(parts["magnitude"], base, name)  # DoRA: a magnitude on top of another kind
    inner = module_from_parts(base, {k: v for k, v in parts.items() if k != "magnitude"}, name)
    return kinds["dora"](inner, parts["magnitude"])


def new_module(base: nn.Module, config: LoRAConfig, rank: int, alpha: float | None) -> nn.Module:
    """A freshly initialised adapter of `config.type` on `base` (DoRA: a LoRA with a magnitude)."""
    kinds = _module_classes()
    if config.type == "dora":
        return kinds["dora"].fresh(base, LoRAModule.fresh(base, rank, alpha, config))
    return kinds[config.type].fresh(base, rank, alpha, config)


class LoRANetwork(nn.Module):
    """A set of LoRAModules keyed by `module_key(root, path)`, attachable to the networks they adapt.

    `paths[key] = (root, path)` names the adapted module: root "unet" (paths in our / original SD names) or
    "text_encoder" (paths inside our CLIPTextEncoder).
    """

    def __init__(self, loras: dict[str, LoRAModule], paths: dict[str, tuple[str, str]], multiplier: float = 1.0):
        super().__init__()
        if set(loras) != set(paths):
            raise ValueError("LoRANetwork: loras and paths must have the same keys")
        self.loras = nn.ModuleDict(loras)
        self.paths = dict(paths)
        self.multiplier = float(multiplier)
        self._handles: list = []
        self._active: LoRANetwork | None = None

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, roots: dict[str, nn.Module], config: LoRAConfig) -> "LoRANetwork":
        """Fresh adapters on the layers `config` names (kohya's rule: Linear and 1x1 convs get rank / alpha,
        kxk convs conv_rank / conv_alpha)."""
        targets = {("unet", p): m for p, m in unet_targets(roots["unet"], config.preset).items()}
        if config.text_encoder:
            if roots.get("text_encoder") is None:
                raise ValueError("adapter.text_encoder=true needs a text encoder")
            targets.update({("text_encoder", p): m for p, m in text_encoder_targets(roots["text_encoder"]).items()})
        conv_rank = config.conv_rank or config.rank
        loras, paths = {}, {}
        for (root, path), module in targets.items():
            spatial = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
            rank, alpha = (conv_rank, config.conv_alpha) if spatial else (config.rank, config.alpha)
            key = module_key(root, path)
            loras[key] = new_module(module, config, rank, alpha)
            paths[key] = (root, path)
        if not loras:
            raise ValueError(f"adapter.preset={config.preset!r} found no layers to adapt in the U-Net")
        return cls(loras, paths)

    @classmethod
    def from_weights(cls, roots: dict[str, nn.Module], weights: dict[tuple[str, str], dict[str, Tensor]],
                     multiplier: float = 1.0) -> "LoRANetwork":
        """A network holding given weights: weights[(root, path)] = parts of one adapter kind (``adapter_kind``):
        {"down": A, "up": B, "alpha": scalar | None} for a LoRA, A and B shaped as our Linear / Conv2d weights;
        LyCORIS's hada_* / lokr_* tensors; + "magnitude" for DoRA (ldm.formats.lora_* produce this)."""
        loras, paths = {}, {}
        for (root, path), w in weights.items():
            lora = module_from_parts(roots[root].get_submodule(path), w, f"{root}.{path}")
            key = module_key(root, path)
            loras[key], paths[key] = lora, (root, path)
        return cls(loras, paths, multiplier)

    def weights(self) -> dict[tuple[str, str], dict[str, Tensor]]:
        """The inverse of `from_weights` (what the file writers take)."""
        return {self.paths[k]: m.parts() for k, m in self.loras.items()}

    def load_weights(self, weights: dict[tuple[str, str], dict[str, Tensor]]) -> list[str]:
        """Copy matching adapters in (training that starts from a LoRA file); returns the names this network has
        no adapter for (the caller reports them). A shape mismatch is an error naming the layer."""
        missing = []
        by_path = {v: k for k, v in self.paths.items()}
        for (root, path), w in weights.items():
            key = by_path.get((root, path))
            if key is None:
                missing.append(f"{root}.{path}")
                continue
            lora = self.loras[key]
            have = lora.parts()
            if adapter_kind(w) != lora.algo:
                raise ValueError(f"adapter weights for {root}.{path}: the file holds a {adapter_kind(w)}, the "
                                 f"configured adapter is a {lora.algo} (set adapter.type)")
            shapes = {k: tuple(t.shape) for k, t in have.items() if k != "alpha"}
            given = {k: tuple(w[k].shape) for k in w if k != "alpha" and w[k] is not None}
            if shapes != given:
                raise ValueError(f"adapter weights for {root}.{path}: rank or shape {given} does not fit the "
                                 f"configured adapter {shapes} (set adapter.rank / conv_rank / factor)")
            with torch.no_grad():
                for k, tensor in have.items():
                    if k != "alpha":
                        tensor.copy_(w[k])
                have["alpha"].fill_(float(w["alpha"]) if w.get("alpha") is not None else lora.rank)
        return missing

    # -------------------------------------------------------------------------------------------- applying
    def attach(self, roots: dict[str, nn.Module]) -> "LoRANetwork":
        """Add the adapters to the base modules' outputs (forward hooks; the base keeps its parameters)."""
        self.detach()
        for key, (root, path) in self.paths.items():
            module = roots[root].get_submodule(path)
            self._handles.append(module.register_forward_hook(_Hook(self, key)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def weights_of(self, other: "LoRANetwork") -> Iterator[None]:
        """While inside, the attached hooks apply `other`'s adapters (same keys), e.g. the EMA copy."""
        previous, self._active = self._active, other
        try:
            yield
        finally:
            self._active = previous

    def delta(self, key: str, x: Tensor, base: nn.Module | None = None) -> Tensor:
        """What adapter `key` adds to its layer's output for input x (DoRA needs the base layer's weight)."""
        net = self._active if self._active is not None else self
        return net.loras[key].delta(x, base) * net.multiplier

    @torch.no_grad()
    def merge_into(self, roots: dict[str, nn.Module], multiplier: float | None = None) -> None:
        """Bake the adapters into the base weights: W <- W + multiplier * weight_delta(W) ((alpha / r) B A for a
        LoRA)."""
        m = self.multiplier if multiplier is None else float(multiplier)
        for key, (root, path) in self.paths.items():
            weight = roots[root].get_submodule(path).weight
            weight.add_((self.loras[key].weight_delta(weight).float() * m).reshape(weight.shape).to(weight.dtype))

    def __getstate__(self):  # deepcopy (EMA) copies the adapters, not the hooks on the base modules
        state = super().__getstate__().copy()
        state["_handles"], state["_active"] = [], None
        return state


class _Hook:
    """forward hook: output + adapter(input)."""

    def __init__(self, network: LoRANetwork, key: str):
        self.network, self.key = network, key

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + self.network.delta(self.key, args[0], module).to(output.dtype)
