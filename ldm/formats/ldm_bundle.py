"""Our own compact export: one self-contained folder that rebuilds the exact :class:`~ldm.models.bundle.ModelBundle`.

Layout::

    ldm_bundle.json     format + version, the model config (U-Net / autoencoder / text encoder nodes with
                        ``_target_``, the noise schedule as ``NoiseSchedule.make`` arguments), training resolution,
                        dtype, which components have weights, where it came from
    model.safetensors   ``unet.*`` and ``autoencoder.*`` weights (our / original key names)
    text_encoder/       transformers ``CLIPTextModel`` (config.json + model.safetensors)
    tokenizer/          its ``CLIPTokenizer``
    text_encoder_2/     SDXL only: ``CLIPTextModelWithProjection`` (bigG), as in a diffusers SDXL folder
    tokenizer_2/        SDXL only: its tokenizer

The ``_target_`` nodes read like Hydra configs, but loading never imports what a file names: only the classes in
``_BUILDERS`` are built, so a downloaded bundle cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.models.bundle import ModelBundle
from ldm.formats.safe_load import CheckpointError, copy_checked, load_state_dict, mismatch_report, read_json_file
from ldm.formats.safe_paths import inside
from ldm.diffusion.flow import FlowMatching
from ldm.diffusion.schedules import NoiseSchedule
from ldm.formats.safe_build import (
    AUTOENCODER_TARGET,
    IDENTITY_TARGET,
    PRETRAINED_DUAL_TEXT_SCHEMA,
    PRETRAINED_TEXT_SCHEMA,
    FLOW_SCHEDULE_TARGET,
    SCHEDULE_TARGET,
    UNET_TARGET,
    build_node,
    check_kwargs,
)
from ldm.formats.common import (
    ExportError,
    _no_checkpointing,
    cast_state,
    save_safetensors,
    schedule_kwargs,
    strip_prefix,
    text_model,
    write_json,
)
from ldm.formats.diffusers_folder import write_hub_text_encoder
from ldm.formats.shared_names import shared_config, shared_name
from ldm.formats.weight_folder import check_text_encoder_folder, inside_model_folder, read_weights
from ldm.formats.dtypes import DTYPES, dtype_name

BUNDLE_FILE = "ldm_bundle.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "ldm_bundle"
FORMAT_VERSION = 1
COMPONENTS = ("unet", "autoencoder", "text_encoder")

AUTOENCODER_TARGETS = (AUTOENCODER_TARGET, IDENTITY_TARGET)
TEXT_ENCODER_TARGET = "ldm.models.text_encoder.CLIPTextEncoder.from_pretrained"
DUAL_TEXT_ENCODER_TARGET = "ldm.models.text_encoder_sdxl.DualCLIPTextEncoder.from_pretrained"  # SDXL: ViT-L + bigG
TEXT_SCHEMAS = {TEXT_ENCODER_TARGET: PRETRAINED_TEXT_SCHEMA, DUAL_TEXT_ENCODER_TARGET: PRETRAINED_DUAL_TEXT_SCHEMA}


def _target(module: nn.Module) -> str:
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    if name not in (UNET_TARGET, *AUTOENCODER_TARGETS):
        raise ExportError(f"cannot describe a {name} in an ldm bundle; supported: "
                          f"{sorted((UNET_TARGET, *AUTOENCODER_TARGETS))}")
    return name


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# writing


def bundle_config(bundle: ModelBundle, *, frozen: bool = True, dtype: torch.dtype | None = None,
                  resolution: int | None = None) -> dict[str, Any]:
    """The ``ldm_bundle.json`` content for ``bundle``."""
    te = bundle.text_encoder
    model: dict[str, Any] = {
        "unet": {"_target_": _target(bundle.unet), **_no_checkpointing(bundle.unet.config)},
        "autoencoder": {"_target_": _target(bundle.autoencoder), **_no_checkpointing(bundle.autoencoder.config)},
        "text_encoder": None if te is None else _text_encoder_node(te),
    }
    components = ["unet"]  # the parts whose weights are written
    if frozen:
        if _has_weights(bundle.autoencoder):  # an IdentityAutoencoder (pixel space) has none
            components.append("autoencoder")
        if te is not None:
            components.append("text_encoder")
    meta = bundle.meta or {}
    # where it came from, as a name people may see: a bundle is shared, the user's folders are not (shared_names)
    source = {"path": shared_name(bundle.source), "format": meta.get("format"),
              "global_step": meta.get("global_step"), "ema": meta.get("ema")}
    config: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "weights": WEIGHTS_FILE,
        "dtype": dtype_name(dtype or next(bundle.unet.parameters()).dtype),
        "components": components,
        "model": model,
        "schedule": _schedule_node(bundle.schedule),
        "resolution": resolution,
        "source": {k: v for k, v in source.items() if v is not None},
    }
    if meta.get("vae_fp32", hasattr(te, "model_2")):  # as write_diffusers' force_upcast
        config["vae_fp32"] = True  # SDXL's VAE overflows in float16: load_bundle keeps it float32
    trained = meta.get("model_config")
    if isinstance(trained, dict):
        # what the run was configured with (for reference; not read back), its paths as shareable names
        config["training_config"] = shared_config(trained)
    return config


def _text_encoder_node(te) -> dict[str, Any]:
    """How load_ldm_bundle rebuilds the text encoder from this folder (text_encoder/ + tokenizer/, and for SDXL's
    dual encoder text_encoder_2/ + tokenizer_2/)."""
    if hasattr(te, "model_2"):
        return {"_target_": DUAL_TEXT_ENCODER_TARGET, "path_or_hub_id": ".", "zero_uncond": bool(te.zero_uncond),
                "max_chunks": int(te.max_chunks)}
    return {
        "_target_": TEXT_ENCODER_TARGET,
        "path_or_hub_id": ".",  # this folder: text_encoder/ + tokenizer/
        "penultimate": bool(getattr(te, "penultimate", False)),
        "max_chunks": int(getattr(te, "max_chunks", 1)),  # long prompts (A1111 chunks of 75 tokens)
    }


def write_ldm_bundle(bundle: ModelBundle, folder: Path, *, frozen: bool = True, dtype: torch.dtype | None = None,
                     resolution: int | None = None) -> list[str]:
    """Write ``bundle`` into ``folder`` (which should be new or empty). Returns the written entries."""
    folder = Path(folder)
    config = bundle_config(bundle, frozen=frozen, dtype=dtype, resolution=resolution)
    state = {f"unet.{k}": v for k, v in bundle.unet.state_dict().items()}
    if "autoencoder" in config["components"]:
        state.update({f"autoencoder.{k}": v for k, v in bundle.autoencoder.state_dict().items()})
    save_safetensors(cast_state(state, dtype), folder / WEIGHTS_FILE,
                     metadata={"ldm_bundle": json.dumps({"version": FORMAT_VERSION})})
    written = [WEIGHTS_FILE]
    if "text_encoder" in config["components"]:
        written += write_hub_text_encoder(bundle.text_encoder, folder, dtype)
    write_json(folder / BUNDLE_FILE, json.loads(json.dumps(config, default=str)))
    return written + [BUNDLE_FILE]


def save_ldm_bundle(bundle: ModelBundle, folder, *, frozen: bool = True, dtype: torch.dtype | None = None,
                    resolution: int | None = None) -> Path:
    """Convenience: write straight into ``folder`` (``ldm.formats.exporter.export`` adds the atomic rename and checks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_ldm_bundle(bundle, folder, frozen=frozen, dtype=dtype, resolution=resolution)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# reading


def read_bundle_config(folder) -> dict[str, Any]:
    """Parse and check ``ldm_bundle.json``."""
    folder = Path(folder)
    path = folder / BUNDLE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: not an ldm bundle (no {BUNDLE_FILE})")
    config = read_json_file(path)  # bounded: size, nesting
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an ldm bundle description (format is not {FORMAT!r})")
    version = config.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: bundle format version {version!r}; this ldm reads up to {FORMAT_VERSION} "
                              "(update ldm)")
    model = config.get("model") or {}
    if not isinstance(model.get("unet"), dict) or not isinstance(model.get("autoencoder"), dict):
        raise CheckpointError(f"{path}: model.unet and model.autoencoder must be config nodes")
    return config


def _schedule_node(schedule) -> dict:
    """The stored schedule: NoiseSchedule.make's arguments, or a flow-matching schedule's fields under its
    ``_target_`` (one of safe_build's names)."""
    if isinstance(schedule, FlowMatching):
        return {"_target_": FLOW_SCHEDULE_TARGET, **dataclasses.asdict(schedule)}
    return {"_target_": SCHEDULE_TARGET, **schedule_kwargs(schedule)}


def _schedule(config: dict, path: Path) -> NoiseSchedule:
    """The stored schedule (bundles written before flow matching hold no ``_target_``: NoiseSchedule.make)."""
    node = {"_target_": SCHEDULE_TARGET, **(config.get("schedule") or {})}
    return build_node(node, "schedule", source=str(path), key="schedule")


def _read_weights(folder: Path, config: dict) -> dict[str, dict[str, torch.Tensor]]:
    name = config.get("weights", WEIGHTS_FILE)
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise CheckpointError(f"{folder / BUNDLE_FILE}: weights = {name!r} must be a .safetensors file name inside "
                              "the bundle folder")
    state = load_state_dict(inside_model_folder(folder, name, source=str(folder / BUNDLE_FILE), key="weights"))
    parts = {c: strip_prefix(state, f"{c}.") for c in ("unet", "autoencoder")}
    stray = [k for k in state if not k.startswith(("unet.", "autoencoder."))]
    if stray:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: unexpected entries {stray[:5]}")
    return parts


def _text_node(folder: Path, node: dict) -> tuple[str, dict]:
    """The stored text-encoder node (target, checked arguments), before anything is read or built."""
    source = str(folder / BUNDLE_FILE)
    target = node.get("_target_") if isinstance(node, dict) else None
    if target not in TEXT_SCHEMAS:
        raise CheckpointError(f"{source}: model.text_encoder._target_ must be one of {sorted(TEXT_SCHEMAS)}")
    node = check_kwargs({k: v for k, v in node.items() if k != "_target_"}, TEXT_SCHEMAS[target], source=source,
                        key="model.text_encoder")
    if node.get("path_or_hub_id", ".") != ".":
        raise CheckpointError(f"{source}: the text encoder must be inside the bundle (path_or_hub_id: '.')")
    subs = ["text_encoder"] + (["text_encoder_2", "tokenizer", "tokenizer_2"] if target == DUAL_TEXT_ENCODER_TARGET
                               else [])
    for sub in subs:
        if not (folder / sub).is_dir():
            raise CheckpointError(f"{folder}: no {sub}/ folder (model.text_encoder is {target})")
    for sub in {*subs, "tokenizer"}:  # inside the bundle: a folder shipped as a symlink out of it is refused
        inside(folder, sub, source=source, key="model.text_encoder")
    for sub in subs[:2]:  # sizes checked against the weights before transformers allocates them
        check_text_encoder_folder(folder / sub, projection=sub == "text_encoder_2")
    return target, node


def _text_encoder(folder: Path, target: str, node: dict, dtype: torch.dtype):
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.models.text_encoder import CLIPTextEncoder

    if target == DUAL_TEXT_ENCODER_TARGET:
        from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder

        return DualCLIPTextEncoder.from_pretrained(folder, **{k: v for k, v in node.items()
                                                              if k != "path_or_hub_id"}).to(dtype)
    model = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer")) if (folder / "tokenizer").is_dir() else None
    max_length = model.config.max_position_embeddings
    if tokenizer is not None:
        max_length = min(max_length, tokenizer.model_max_length)
    te = CLIPTextEncoder(model, tokenizer, penultimate=bool(node.get("penultimate", False)), max_length=max_length,
                         max_chunks=int(node.get("max_chunks", 1)))
    return te.to(dtype)


def _assign(module: nn.Module, state: dict, source: str) -> nn.Module:
    """Fill a meta-device module with ``state`` (strict: all keys, right shapes), taking over its tensors."""
    report = mismatch_report(module, state, strict=True)
    if report:
        raise CheckpointError(f"cannot load {source}\n{report}")
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: no values for {left[:5]}")
    return module


def load_ldm_bundle(folder, *, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild the exported model: configs from ``ldm_bundle.json``, weights strictly, in the stored dtype.

    A bundle written with ``--no-frozen`` holds only the U-Net: load it with :func:`load_ldm_bundle_into`."""
    folder = Path(folder)
    config = read_bundle_config(folder)
    path = folder / BUNDLE_FILE
    missing = [c for c in COMPONENTS if c not in config.get("components", []) and config["model"].get(c) is not None
               and not (c == "autoencoder" and config["model"][c].get("_target_") == AUTOENCODER_TARGETS[1])]
    if missing:
        raise CheckpointError(f"{folder}: the bundle has no {' / '.join(missing)} weights (exported with "
                              "--no-frozen); use load_ldm_bundle_into(folder, unet, autoencoder, text_encoder) with "
                              "the frozen parts from elsewhere")
    dtype = DTYPES.get(config.get("dtype", "float32")) if isinstance(config.get("dtype", "float32"), str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: unknown dtype {config.get('dtype')!r}")
    schedule = _schedule(config, path)
    modules = {}  # every config checked and built (on the meta device) before any weight is read
    for name, allowed in (("unet", (UNET_TARGET,)), ("autoencoder", AUTOENCODER_TARGETS)):
        node = config["model"][name]
        if node.get("_target_") not in allowed:
            raise CheckpointError(f"{path}: model.{name}._target_ {node.get('_target_')!r} is not one of "
                                  f"{list(allowed)}")
        modules[name] = build_node(node, name, source=str(path), key=f"model.{name}", meta=True)
    te_node = config["model"].get("text_encoder")
    te_node = _text_node(folder, te_node) if te_node is not None else None
    weights = _read_weights(folder, config)
    modules = {name: _assign(m, weights[name], f"{folder} ({name})") for name, m in modules.items()}
    te = _text_encoder(folder, *te_node, dtype) if te_node is not None else None
    meta = {"format": "ldm_bundle", "resolution": config.get("resolution"), "bundle": config}
    if config.get("vae_fp32"):
        meta["vae_fp32"] = True
    src = config.get("source") or {}
    meta.update({k: src[k] for k in ("global_step", "ema") if k in src})
    bundle = ModelBundle(modules["unet"], modules["autoencoder"], te, schedule, source=str(folder), meta=meta)
    return bundle.to(device).eval()


def load_ldm_bundle_into(folder, unet: nn.Module, autoencoder: nn.Module | None = None,
                         text_encoder: nn.Module | None = None, *, strict: bool = True) -> dict[str, Any]:
    """Load a bundle's weights into existing modules (fine-tuning: ``model.pretrained=<bundle folder>``).

    Every given module is checked before anything is copied (one ``CheckpointError`` naming all problems); values
    are cast to the modules' dtype. A module whose weights the bundle does not have (``--no-frozen`` exports) is an
    error: pass None for it to keep its own weights. Returns ``{"loaded": [...], "schedule": NoiseSchedule,
    "resolution": int | None, "config": <ldm_bundle.json>}``.
    """
    from ldm.models.text_encoder import to_module_keys

    folder = Path(folder)
    config = read_bundle_config(folder)
    have = set(config.get("components", []))
    given = {"unet": unet, "autoencoder": autoencoder, "text_encoder": text_encoder}
    absent = [n for n, m in given.items() if m is not None and n not in have
              and not (n == "autoencoder" and not _has_weights(m))]
    if absent:
        raise CheckpointError(f"{folder}: the bundle has no {' / '.join(absent)} weights (exported with "
                              "--no-frozen); pass None for them to keep their own weights")
    weights = _read_weights(folder, config)
    jobs = [(unet, weights["unet"], "unet")]
    if autoencoder is not None and "autoencoder" in have:
        jobs.append((autoencoder, weights["autoencoder"], "autoencoder"))
    if text_encoder is not None:
        model = text_model(text_encoder)
        jobs.append((model, to_module_keys(read_weights(folder / "text_encoder", "model"), model), "text_encoder"))
        if hasattr(text_encoder, "model_2") != (folder / "text_encoder_2").is_dir():
            raise CheckpointError(f"{folder}: an SDXL bundle (text_encoder_2/) loads into the dual SDXL text encoder "
                                  f"only, and it only from one; got a {type(text_encoder).__name__}")
        if hasattr(text_encoder, "model_2"):
            state_2 = {k: v for k, v in read_weights(folder / "text_encoder_2", "model").items()
                       if not k.endswith("position_ids")}
            jobs.append((text_encoder.model_2, state_2, "text_encoder_2"))
    reports = [r for m, s, n in jobs if (r := mismatch_report(m, s, strict=strict, name=n))]
    if reports:
        raise CheckpointError(f"cannot load {folder}\n" + "\n".join(reports))
    for module, state, name in jobs:  # a module built on the meta device gets its memory here, once checked
        copy_checked(module, state, source=f"{folder} ({name})")
    return {"loaded": [n for _, _, n in jobs], "schedule": _schedule(config, folder / BUNDLE_FILE),
            "resolution": config.get("resolution"), "config": config}
