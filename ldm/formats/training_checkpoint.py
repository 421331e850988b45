"""Read our Lightning training checkpoints back as a ModelBundle (EMA weights by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm.formats.bundle import ModelBundle
from ldm.formats.common import strip_prefix
from ldm.formats.safe_load import CheckpointError, load_into
from ldm.formats.safe_build import build_node


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True (never unpickle code); a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "ldm" not in ckpt:
        raise CheckpointError(f"{path}: not an ldm training checkpoint (no 'state_dict'/'ldm' entries)")
    return ckpt


def is_training_checkpoint(path: str | Path) -> bool:
    try:
        read_checkpoint(path)
        return True
    except (CheckpointError, FileNotFoundError):
        return False


def _model_config(ckpt: dict, path) -> tuple[dict, dict]:
    entry = ckpt["ldm"]
    model_cfg = entry.get("model") if isinstance(entry, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("model"), dict):
        raise CheckpointError(f"{path}: ldm.model must hold the run's model config ('model' and 'schedule' nodes)")
    return model_cfg, model_cfg["model"]


def load_training_checkpoint(path: str | Path, use_ema: bool = True) -> ModelBundle:
    """Rebuild the networks from the model config saved in the checkpoint and load its weights strictly.

    The stored config is data: only our own classes, with plain bounded arguments, are built from it
    (``ldm.formats.safe_build``); nothing it names is imported or called.
    use_ema: take the U-Net weights from the EMA copy when the run kept one (the default for sampling)."""
    ckpt = read_checkpoint(path)
    model_cfg, m = _model_config(ckpt, path)
    src = str(path)
    schedule = build_node(model_cfg.get("schedule"), "schedule", source=src, key="ldm.model.schedule")
    unet = build_node(m.get("unet"), "unet", source=src, key="ldm.model.model.unet")
    autoencoder = build_node(m.get("autoencoder"), "autoencoder", source=src, key="ldm.model.model.autoencoder")
    text_encoder = build_node(m.get("text_encoder"), "text_encoder", source=src, key="ldm.model.model.text_encoder")
    state = ckpt["state_dict"]
    ema_state = strip_prefix(state, "ema.model.")
    unet_state = ema_state if (use_ema and ema_state) else strip_prefix(state, "unet.")
    load_into(unet, unet_state, source=f"{path} ({'EMA' if use_ema and ema_state else 'raw'} U-Net)")
    load_into(autoencoder, strip_prefix(state, "autoencoder."), source=f"{path} (autoencoder)")
    text_state = strip_prefix(state, "text_encoder.")
    if text_state:
        load_into(text_encoder, text_state, source=f"{path} (text encoder)")
    bundle = ModelBundle(unet, autoencoder, text_encoder, schedule, source=str(path),
                         meta={"global_step": ckpt.get("global_step"), "ema": bool(use_ema and ema_state),
                               "model_config": model_cfg, "resolution": model_cfg.get("resolution")})
    return bundle.eval()
