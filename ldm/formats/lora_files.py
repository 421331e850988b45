"""LoRA files of any layout we know: detect it, read it, write it, and apply files to a model.

Layouts: `kohya` (ldm/formats/lora_kohya.py; also what we write as our own file, with `ldm_lora` metadata; LoRA,
LoHa, LoKr and DoRA in LyCORIS's names; an MMDiT's as sd-scripts' SD3 LoRAs) and `peft` (ldm/formats/lora_peft.py,
diffusers' `pytorch_lora_weights.safetensors`; LoRA and DoRA; an MMDiT's as StableDiffusion3Pipeline loads them). Only safetensors are read:
a pickled LoRA (.pt/.ckpt/.bin) could run code when unpickled, so it is refused with the way to convert it.
Reading never imports or calls anything a file names; metadata is kept as strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from ldm.formats import lora_kohya, lora_peft
from ldm.models.lora import LoRANetwork, adapter_kind

LAYOUTS = ("kohya", "peft")


class LoRAFileError(ValueError):
    """A LoRA file cannot be read or does not fit the model; the message names the file."""


@dataclass
class LoRAFile:
    path: str
    layout: str
    # (root, our module path) -> the adapter's parts: down / up / alpha for a LoRA, hada_* / lokr_* for LoHa / LoKr,
    # + magnitude for DoRA (ldm.models.lora.adapter_kind tells them apart)
    weights: dict[tuple[str, str], dict[str, Tensor]]
    unmapped: list[str] = field(default_factory=list)  # keys of the file that address nothing of ours
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        """The adapter kinds the file holds ("lora", "loha", "lokr", "dora", ...)."""
        return sorted({adapter_kind(w) for w in self.weights.values()})

    def network(self, roots: dict[str, nn.Module], multiplier: float = 1.0) -> LoRANetwork:
        return LoRANetwork.from_weights(roots, self.weights, multiplier)


def resolve(path: str | Path) -> Path:
    """A file, or a folder holding diffusers' pytorch_lora_weights.safetensors (what load_lora_weights takes)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / lora_peft.WEIGHT_NAME
    if not p.is_file():
        raise LoRAFileError(f"LoRA file not found: {p}")
    if p.suffix.lower() != ".safetensors":
        raise LoRAFileError(f"{p}: LoRA files are read only as .safetensors (a pickled file can run code when "
                            "loaded); convert it with safetensors.torch.save_file on a machine you trust")
    return p


def detect_layout(keys) -> str:
    keys = list(keys)
    if lora_kohya.is_kohya(keys):
        return "kohya"
    if lora_peft.is_peft(keys):
        return "peft"
    shown = ", ".join(keys[:5])
    raise LoRAFileError(f"not a LoRA layout we know (kohya `lora_unet_*.lora_down.weight` or diffusers/PEFT "
                        f"`unet.*.lora_A.weight`); first keys: {shown}")


def file_kinds(path: str | Path) -> set[str]:
    """The adapter kinds a LoRA file holds, from its key names only (the header; no tensor is read): "loha",
    "lokr", "dora" (a magnitude: `dora_scale` / `lora_magnitude_vector`), else "lora"."""
    from safetensors import safe_open

    p = resolve(path)
    try:
        with safe_open(str(p), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - the Rust reader's errors, named with the file
        raise LoRAFileError(f"{p}: corrupt or truncated safetensors file ({e})") from e
    suffixes = {"hada_w1_a": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr", "dora_scale": "dora",
                "lora_magnitude_vector": "dora"}
    found = {kind for key in keys for part, kind in suffixes.items() if key.endswith("." + part)
             or key.endswith(f".{part}.weight")}
    return found or {"lora"}


def read_lora_file(path: str | Path, roots: dict[str, nn.Module]) -> LoRAFile:
    """Read and map a LoRA file onto `roots` ({"unet": ..., "text_encoder": ...}). Unmapped keys are returned, not
    dropped: callers report them."""
    from safetensors import safe_open

    p = resolve(path)
    try:
        with safe_open(str(p), "pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - the Rust reader's errors, named with the file
        raise LoRAFileError(f"{p}: corrupt or truncated safetensors file ({e})") from e
    try:
        layout = detect_layout(state)
        if layout == "kohya":
            weights, unmapped = lora_kohya.from_kohya(state, roots)
        else:
            weights, unmapped = lora_peft.from_peft(state, roots, metadata)
        for target, w in weights.items():  # shapes are checked here, before anything is changed
            LoRANetwork.from_weights(roots, {target: w})
    except (ValueError, KeyError) as e:
        raise LoRAFileError(f"{p}: {e}") from e
    if not weights:
        raise LoRAFileError(f"{p}: none of its {len(state)} keys address a layer of this model (first: "
                            f"{', '.join(unmapped[:5])}); is it a LoRA for another architecture?")
    return LoRAFile(str(p), layout, weights, unmapped, metadata)


def save_lora_file(network: LoRANetwork, roots: dict[str, nn.Module], path: str | Path, layout: str = "kohya",
                   metadata: dict[str, str] | None = None, **kohya_meta) -> Path:
    """Write `network` as `layout` (kohya: one .safetensors; peft: `path` is a folder that gets
    pytorch_lora_weights.safetensors). Written to a temporary name and renamed."""
    from ldm.file_modes import write_safetensors

    from ldm.models.quantized_base import base_precision_metadata

    if layout not in LAYOUTS:
        raise ValueError(f"LoRA layout must be one of {LAYOUTS}, got {layout!r}")
    path = Path(path)
    if layout == "kohya":
        state = lora_kohya.to_kohya(network, roots)
        meta = lora_kohya.kohya_metadata(network, roots, **kohya_meta)
    else:
        path.mkdir(parents=True, exist_ok=True)
        path = path / lora_peft.WEIGHT_NAME
        state, meta = lora_peft.to_peft(network, roots)
    meta.update(base_precision_metadata(roots) if layout == "kohya" else
                {"ldm_base_precision": base_precision_metadata(roots)["ldm_base_precision"]})  # the base it saw
    meta.update(metadata or {})
    if layout == "kohya":  # sd-scripts' sshs_* hashes of the tensors and the final ss_* keys
        meta.update(lora_kohya.sshs_hashes(state, meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(state, tmp, metadata={k: str(v) for k, v in meta.items()})  # 0644 under umask 022
    tmp.replace(path)
    return path


def diffusers_needs_peft(network: LoRANetwork, roots: dict[str, nn.Module]) -> bool:
    """Whether diffusers needs the PEFT layout beside our kohya file: StableDiffusion3Pipeline's loader
    (SD3LoraLoaderMixin.lora_state_dict) converts no kohya names, where SD 1.x / 2.x / XL's and FLUX.1's do. True for
    an MMDiT LoRA / DoRA the layout can hold (LoHa / LoKr and T5 adapters have no diffusers form)."""
    from ldm.models.mmdit import MMDiT

    weights = network.weights()
    return (isinstance(roots["unet"], MMDiT)
            and {adapter_kind(w) for w in weights.values()} <= {"lora", "dora"}
            and not any(root == "text_encoder" and path.startswith("t5.") for root, path in weights))


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`FILE` or `FILE:SCALE` -> (file, scale)."""
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def apply_lora_files(roots: dict[str, nn.Module], specs, report=print) -> list[LoRAFile]:
    """Merge each `FILE[:SCALE]` into the networks' weights (W += scale * weight_delta(W): alpha/r * B A for a LoRA),
    in order. Every file is
    read and checked before any weight changes; unmapped keys are reported through `report`."""
    files = []
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        files.append((read_lora_file(path, roots), scale))
    for lora, scale in files:
        lora.network(roots).merge_into(roots, scale)
        kinds = "" if lora.kinds == ["lora"] else f" {'/'.join(lora.kinds)}"
        msg = f"LoRA {lora.path} ({lora.layout}{kinds}, {len(lora.weights)} layers, scale {scale:g})"
        if lora.unmapped:
            shown = ", ".join(lora.unmapped[:10]) + (" ..." if len(lora.unmapped) > 10 else "")
            msg += f": {len(lora.unmapped)} keys not applied (they address nothing in this model): {shown}"
        report(msg)
    return [f for f, _ in files]


def ldm_metadata(config) -> dict[str, str]:
    """Our own key in the file: the adapter config (JSON data, never executed). A LoRA file is shared: a path in
    it (``init_from``) is written as a shareable name (``ldm.formats.shared_names``), never the user's home."""
    from dataclasses import asdict

    from ldm.formats.shared_names import shared_config

    config = asdict(config) if hasattr(config, "__dataclass_fields__") else dict(config)
    return {"ldm_lora": json.dumps(shared_config(config))}


def bundle_roots(bundle) -> dict[str, nn.Module]:
    return {"unet": bundle.unet, "text_encoder": bundle.text_encoder}
