"""``load_bundle(source)``: any supported model source -> :class:`~ldm.models.bundle.ModelBundle`.

What ``source`` may be (``detect_source`` tells them apart by reading headers / key names only):

- ``training_checkpoint``: a Lightning ``.ckpt`` of our training run (``state_dict`` with ``unet.*`` keys);
- ``ldm_bundle``: our export folder (``ldm_bundle.json``);
- ``sd_single_file``: an original Stable Diffusion ``.safetensors`` / ``.ckpt`` (``model.diffusion_model.*``);
  SD1 vs SD2 and the U-Net / VAE sizes come from the key shapes (or from the config that
  :func:`save_single_file` stores in the safetensors header); the schedule is SD's scaled_linear
  0.00085..0.012 with eps prediction unless ``prediction_type`` says otherwise (SD 2.x 768-v: "v_prediction");
- ``diffusers``: a folder with ``model_index.json`` or ``unet/`` + ``vae/``, or a hub id (``org/name``);
- ``sd3_diffusers`` / ``flux_diffusers``: an SD3 / FLUX.1 diffusers folder (``transformer/`` + ``vae/``), or a hub id
  of one (``sd3_folder``, ``flux_folder``); ``sd3_single_file``: SD3 in ComfyUI's layout.

Pickled files are never unpickled to detect them (their pickle opcodes are scanned), and loaded with
``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.formats.detect import detect_source, looks_like_hub_id
from ldm.formats.diffusers_folder import load_diffusers
from ldm.formats.dtypes import DTYPES
from ldm.formats.flux_folder import load_flux_diffusers
from ldm.formats.ldm_bundle import load_ldm_bundle
from ldm.formats.sd3_folder import hub_folder, load_sd3_diffusers
from ldm.formats.sd3_single_file import load_sd3_single_file
from ldm.formats.single_file import load_sd_single_file
from ldm.formats.training_checkpoint import load_training_checkpoint
from ldm.formats.weight_folder import check_text_encoder_folder


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
    original = source
    if kind == "hub":  # an SD3 / FLUX.1 repo is read by its loader (what it is shows once its files are here)
        source, kind = hub_folder(source)
    if kind in ("sd3_diffusers", "sd3_single_file", "flux_diffusers"):  # their own text encoders and loaders
        if prediction_type is not None:
            raise ValueError(f"{source}: an {'SD3' if kind.startswith('sd3') else 'FLUX.1'} model predicts the flow "
                             f"velocity; prediction_type={prediction_type!r} does not apply to it")
        bundle = (load_flux_diffusers(source, text_encoder=text_encoder) if kind == "flux_diffusers"
                  else load_sd3(source, kind, text_encoder))
        bundle.meta.setdefault("format", kind)
        bundle.source = str(original)
        return bundle.to(device, dtype).eval()
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


# --------------------------------------------------------------------------------------------------------------
# what is it?


def load_sd3(source, kind: str, text_encoder: Any = None) -> ModelBundle:
    """An SD3 / SD3.5 diffusers folder or single file. text_encoder: an SD3TextEncoder, or an SD3 diffusers folder
    whose tokenizers and text encoders are used (a single file's text weights are loaded over them)."""
    if kind == "sd3_single_file":
        return load_sd3_single_file(source, text_encoder=text_encoder)
    return load_sd3_diffusers(source, text_encoder=text_encoder)


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
    if (Path(text_encoder) / "text_encoder_2").is_dir():  # an SDXL folder: ViT-L + bigG
        from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder

        for sub in ("text_encoder", "text_encoder_2"):  # sizes checked against the weights before allocation
            check_text_encoder_folder(Path(text_encoder) / sub, projection=sub == "text_encoder_2")
        return DualCLIPTextEncoder.from_pretrained(text_encoder)
    if Path(text_encoder).is_dir():
        check_text_encoder_folder(Path(text_encoder) / "text_encoder")
    return CLIPTextEncoder.from_pretrained(text_encoder)


def with_prediction_type(schedule: NoiseSchedule, prediction_type: str) -> NoiseSchedule:
    return replace(schedule, prediction_type=prediction_type)


# --------------------------------------------------------------------------------------------------------------
# SD single files


# --------------------------------------------------------------------------------------------------------------
# diffusers folders and hub ids

