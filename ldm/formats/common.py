"""What every format shares: the dtype table, the key-prefix stripper, the text-model getter, safetensors / JSON
writing, the schedule's stored arguments.

Writers take a :class:`~ldm.models.bundle.ModelBundle` and never modify it: weights are read from ``state_dict()``
and cast on the way out (``dtype``), so exporting fp16 leaves the caller's fp32 modules as they were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldm.diffusion.schedules import NoiseSchedule
from ldm.file_modes import write_safetensors

# Our schedule kinds -> diffusers' beta_schedule names, and -> the original ldm code's (``make_beta_schedule``).
# The original "linear" is linear in sqrt(beta): our scaled_linear (SD); our linear (DDPM) is its "sqrt_linear".
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


class ExportError(ValueError):
    """The model cannot be written in the asked format, or the output path is not writable as asked."""


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; floating ones cast to ``dtype`` (None keeps them)."""
    out = {}
    for key, value in state.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.to("cpu").contiguous()
    return out


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors creates 0600 files; others (a ComfyUI server) must read them: the umask decides (ldm/file_modes.py)
    write_safetensors(state, path, metadata={"format": "pt", **(metadata or {})})


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def schedule_kwargs(schedule: NoiseSchedule) -> dict:
    """``NoiseSchedule.make`` arguments that rebuild ``schedule`` exactly."""
    check_schedule(schedule)
    return {"kind": schedule.kind, "num_train_timesteps": schedule.num_train_timesteps,
            "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
            "rescale_zero_terminal_snr": bool(schedule.zero_terminal_snr),
            "prediction_type": schedule.prediction_type}


def check_schedule(schedule: NoiseSchedule) -> None:
    if not isinstance(schedule, NoiseSchedule):  # flow matching: no U-Net layout of SD 1.x / 2.x / XL stores one
        raise ExportError(f"the model was trained with {type(schedule).__name__} (schedule=flow): the SD 1.x / 2.x / "
                          "XL layouts store only noise schedules; write it with --format ldm")
    if schedule.kind not in DIFFUSERS_BETA_SCHEDULES:
        raise ExportError(f"the noise schedule is {schedule.kind!r}: only the named schedules "
                          f"{sorted(DIFFUSERS_BETA_SCHEDULES)} (NoiseSchedule.make) can be written into a config")


def check_sd_layout(bundle, what: str) -> None:
    """The parts every Stable Diffusion layout needs: a KL autoencoder, a text encoder, a named schedule."""
    if not is_kl_autoencoder(bundle.autoencoder):
        raise ExportError(f"a pixel-space model (no AutoencoderKL) cannot be written as {what}; use --format ldm")
    if bundle.text_encoder is None:
        raise ExportError(f"the model has no text encoder; {what} needs one (use --format ldm)")
    check_schedule(bundle.schedule)


def is_kl_autoencoder(module) -> bool:
    from ldm.models.autoencoder import AutoencoderKL

    return isinstance(module, AutoencoderKL)


def text_model(text_encoder):
    """The transformers ``CLIPTextModel`` inside our ``CLIPTextEncoder`` (or the model itself)."""
    return getattr(text_encoder, "model", text_encoder)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed (``unet.x`` -> ``x``)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _no_checkpointing(config: dict) -> dict:
    """A module config for an exported model: training-only switches off."""
    return {**config, "gradient_checkpointing": False} if "gradient_checkpointing" in config else dict(config)


# ----------------------------------------------------------------------------------------------------------------
# diffusers


# ----------------------------------------------------------------------------------------------------------------
# original single file + config

