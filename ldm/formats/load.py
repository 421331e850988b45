"""``load_bundle(source)``: any supported model source -> :class:`~ldm.formats.bundle.ModelBundle`.

What ``source`` may be (``detect_source`` tells them apart by reading headers / key names only):

- ``training_checkpoint``: a Lightning ``.ckpt`` of our training run (``state_dict`` with ``unet.*`` keys);
- ``ldm_bundle``: our export folder (``ldm_bundle.json``);
- ``sd_single_file``: an original Stable Diffusion ``.safetensors`` / ``.ckpt`` (``model.diffusion_model.*``);
  SD1 vs SD2 and the U-Net / VAE sizes come from the key shapes (or from the config that
  :func:`save_single_file` stores in the safetensors header); the schedule is SD's scaled_linear
  0.00085..0.012 with eps prediction unless ``prediction_type`` says otherwise (SD 2.x 768-v: "v_prediction");
- ``diffusers``: a folder with ``model_index.json`` or ``unet/`` + ``vae/``, or a hub id (``org/name``).

Pickled files are never unpickled to detect them (their pickle opcodes are scanned), and loaded with
``weights_only=True``.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule
from ldm.formats.bundle import ModelBundle
from ldm.formats.diffusers_folder import load_diffusers, load_diffusers_folder
from ldm.formats.dtypes import DTYPES
from ldm.formats.ldm_bundle import load_ldm_bundle, load_ldm_bundle_into
from ldm.formats.safe_load import CheckpointError, load_state_dict
from ldm.formats.single_file import UNET_PREFIX as SD_UNET_PREFIX
from ldm.formats.single_file import load_sd_single_file, load_single_file
from ldm.formats.training_checkpoint import load_training_checkpoint

SOURCE_KINDS = ("training_checkpoint", "ldm_bundle", "sd_single_file", "diffusers", "hub")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
TRAINING_UNET_PREFIX = "unet."


def load_bundle(source, *, use_ema: bool = True, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None, text_encoder: Any = None, prediction_type: str | None = None,
                unet_config: dict | None = None, vae_config: dict | None = None) -> ModelBundle:
    """Load ``source`` (see the module docstring) as a ModelBundle on ``device`` in eval mode.

    use_ema: the EMA weights where the source has them (training checkpoints, SD files with ``model_ema.*``).
    device / dtype: "auto" picks CUDA (float16) when available, else CPU (float32).
    text_encoder: a CLIPTextEncoder, or a folder / hub id with ``tokenizer/`` + ``text_encoder/``; replaces the
    source's text encoder (an SD single file's text weights are loaded into it, since such files have no tokenizer).
    prediction_type: override the schedule's ("epsilon", "v_prediction", "sample").
    unet_config / vae_config: override constructor arguments inferred for an SD single file (e.g. num_heads).
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kind = detect_source(source)
    te = resolve_text_encoder(text_encoder)
    if kind == "sd_single_file":
        bundle = load_sd_single_file(source, use_ema=use_ema, text_encoder=te, prediction_type=prediction_type,
                                     unet_config=unet_config, vae_config=vae_config)
    elif kind in ("diffusers", "hub"):
        bundle = load_diffusers(source, text_encoder=te)
    elif kind == "training_checkpoint":
        bundle = load_training_checkpoint(source, use_ema=use_ema)
    else:  # ldm_bundle
        bundle = load_ldm_bundle(source)
    if te is not None and kind != "sd_single_file":
        bundle.text_encoder = te
    if prediction_type is not None and prediction_type != bundle.schedule.prediction_type:
        bundle.schedule = with_prediction_type(bundle.schedule, prediction_type)
    bundle.meta.setdefault("format", kind)
    bundle.source = bundle.source or str(source)
    return bundle.to(device, dtype).eval()


def load_weights_into(source, unet: nn.Module, autoencoder: nn.Module | None = None,
                      text_encoder: nn.Module | None = None, *, use_ema: bool = False) -> str:
    """Fill existing modules (fine-tuning: ``model.pretrained``) from ``source``, told apart by ``detect_source``:
    an ldm bundle, a diffusers folder / hub id or an SD single file. Every module is checked before anything is
    copied. Returns the source kind."""
    kind = detect_source(source)
    if kind == "ldm_bundle":
        load_ldm_bundle_into(source, unet, autoencoder, text_encoder)
    elif kind in ("diffusers", "hub"):
        load_diffusers_folder(str(source), unet=unet, vae=autoencoder, text_encoder=text_encoder)
    elif kind == "sd_single_file":
        load_single_file(str(source), unet, vae=autoencoder, text_encoder=text_encoder, use_ema=use_ema)
    else:
        raise CheckpointError(f"{source} is a training checkpoint: continue it with ckpt_path={source}, or export "
                              f"it first (python -m ldm.cli.export {source} --format ldm --out <folder>) and "
                              "fine-tune from that folder")
    return kind


# --------------------------------------------------------------------------------------------------------------
# what is it?


def looks_like_hub_id(source) -> bool:
    s = str(source)
    return (not Path(s).exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) is not None
            and not s.lower().endswith(WEIGHT_SUFFIXES))


def detect_source(source) -> str:
    """One of SOURCE_KINDS. A missing local path -> FileNotFoundError; anything else unknown -> ValueError."""
    if isinstance(source, str) and not source.strip():
        raise ValueError("no model source given: expected a checkpoint file, export folder, diffusers folder or hub id")
    path = Path(source)
    if not path.exists():
        if looks_like_hub_id(source):
            return "hub"
        raise FileNotFoundError(f"model not found: {source} (no such file or folder, and not a hub id 'org/name')")
    if path.is_dir():
        if (path / "ldm_bundle.json").is_file():
            return "ldm_bundle"
        if (path / "model_index.json").is_file() or ((path / "unet").is_dir() and (path / "vae").is_dir()):
            return "diffusers"
        raise ValueError(f"{path}: folder is not a model: expected ldm_bundle.json (ldm export) or "
                         "model_index.json / unet/ + vae/ (diffusers)")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unknown model file type {suffix!r}; expected one of {WEIGHT_SUFFIXES}, "
                         "an export folder or a diffusers folder")
    names = _safetensors_keys(path) if suffix == ".safetensors" else _pickle_strings(path)
    if any(n.startswith(TRAINING_UNET_PREFIX) for n in names) and suffix != ".safetensors" and (
            {"ldm", "ldm_config", "hyper_parameters", "state_dict"} & names):
        return "training_checkpoint"
    if any(n.startswith(SD_UNET_PREFIX) for n in names):
        return "sd_single_file"
    raise ValueError(f"{path}: not a recognised checkpoint: expected 'model.diffusion_model.*' keys (Stable "
                     "Diffusion single file) or a Lightning 'state_dict' with 'unet.*' keys (ldm training checkpoint)")


def _safetensors_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as err:  # SafetensorError from the Rust reader
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err


def _pickle_strings(path: Path) -> set[str]:
    """The string constants of a torch zip checkpoint's pickle (its keys), read without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                raise CheckpointError(f"{path}: not a torch checkpoint (zip without data.pkl)")
            data = zf.read(name)
        return {arg for _, arg, _ in pickletools.genops(io.BytesIO(data)) if isinstance(arg, str)}
    except zipfile.BadZipFile:  # legacy (pre-1.6) torch.save format: weights-only load
        state = load_state_dict(path)
        return set(state) | {"state_dict"}
    except (ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({err})") from err


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device | None = None) -> torch.dtype | None:
    """None keeps the weights' dtype; "auto" = float16 on CUDA, float32 elsewhere."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_text_encoder(text_encoder) -> nn.Module | None:
    """None, a module, or a folder / hub id holding ``tokenizer/`` + ``text_encoder/``."""
    if text_encoder is None or isinstance(text_encoder, nn.Module):
        return text_encoder
    from ldm.models.text_encoder import CLIPTextEncoder

    if not Path(text_encoder).is_dir() and not looks_like_hub_id(text_encoder):
        raise FileNotFoundError(f"text encoder folder not found: {text_encoder}")
    return CLIPTextEncoder.from_pretrained(text_encoder)


def with_prediction_type(schedule: NoiseSchedule, prediction_type: str) -> NoiseSchedule:
    return replace(schedule, prediction_type=prediction_type)


# --------------------------------------------------------------------------------------------------------------
# SD single files


# --------------------------------------------------------------------------------------------------------------
# diffusers folders and hub ids

