"""A first stage on its own, reader and writer: our VAE file (safetensors + its constructor config in the
``ldm_autoencoder_config`` header), or the VAE of an SD single file (``first_stage_model.*``) or of a diffusers
folder (``vae/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ldm.formats.diffusers_folder import load_diffusers_folder
from ldm.formats.safe_build import HEADER_KEY, build_network, stored_autoencoder_config
from ldm.formats.safe_load import load_into, load_state_dict
from ldm.formats.single_file import UNET_PREFIX, split_sd_checkpoint


def save_autoencoder(autoencoder: nn.Module, path: str | Path) -> Path:
    """Write an autoencoder as safetensors with its constructor config in the metadata (atomic rename)."""
    from ldm.file_modes import write_safetensors

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()}
    write_safetensors(state, tmp, metadata={HEADER_KEY: json.dumps(autoencoder.config)})
    tmp.replace(path)
    return path


def load_autoencoder(path: str | Path, preset: str | None = "sd", **overrides: Any) -> nn.Module:
    """An AutoencoderKL filled strictly from ``path``: a diffusers folder (or its ``vae/``), an SD single file, or
    our VAE file, whose stored config wins over ``preset`` (``overrides`` win over both)."""
    from ldm.models.autoencoder import AutoencoderKL

    path = Path(path).expanduser()
    if path.is_dir():
        folder = path.parent if (path / "config.json").is_file() and path.name == "vae" else path
        return load_diffusers_folder(folder, components=("vae",))["vae"]
    state = load_state_dict(path)
    if any(k.startswith(UNET_PREFIX) for k in state):
        state = split_sd_checkpoint(state)["vae"]
    stored = stored_autoencoder_config(path)
    if stored is not None:
        model = build_network("autoencoder", {**stored, **overrides}, source=str(path), key=HEADER_KEY)
    else:
        model = AutoencoderKL.from_preset(preset, **overrides)
    load_into(model, state, source=str(path))
    return model
