"""Read our Lightning training checkpoints back as a ModelBundle (EMA weights by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm.formats.bundle import ModelBundle
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


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


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
    if ckpt["ldm"].get("adapter"):
        return _load_adapter_checkpoint(path, ckpt, use_ema, model_cfg, (unet, autoencoder, text_encoder, schedule))
    state = ckpt["state_dict"]
    ema_state = _sub_state(state, "ema.model.")
    unet_state = ema_state if (use_ema and ema_state) else _sub_state(state, "unet.")
    load_into(unet, unet_state, source=f"{path} ({'EMA' if use_ema and ema_state else 'raw'} U-Net)")
    load_into(autoencoder, _sub_state(state, "autoencoder."), source=f"{path} (autoencoder)")
    text_state = _sub_state(state, "text_encoder.")
    if text_state:
        load_into(text_encoder, text_state, source=f"{path} (text encoder)")
    bundle = ModelBundle(unet, autoencoder, text_encoder, schedule, source=str(path),
                         meta={"global_step": ckpt.get("global_step"), "ema": bool(use_ema and ema_state),
                               "model_config": model_cfg, "resolution": model_cfg.get("resolution")})
    return bundle.eval()


def _load_adapter_checkpoint(path: Path, ckpt: dict[str, Any], use_ema: bool, model_cfg: dict,
                             networks: tuple) -> ModelBundle:
    """A LoRA run's checkpoint holds only the adapter: load the base (built safely from the stored config) from
    model.pretrained, then merge the (EMA) adapter into it. The adapter config is checked as plain data."""
    from dataclasses import fields

    from ldm.formats.safe_build import check_plain
    from ldm.models.lora import LoRAConfig, LoRANetwork
    from ldm.training.factories import build_bundle

    unet, autoencoder, text_encoder, schedule = networks
    pretrained = model_cfg["model"].get("pretrained")
    check_plain(pretrained, source=str(path), key="ldm.model.model.pretrained")
    bundle = build_bundle(unet, autoencoder, text_encoder, schedule, pretrained=pretrained)
    stored = ckpt["ldm"]["adapter"]
    check_plain(stored, source=str(path), key="ldm.adapter")
    known = {f.name for f in fields(LoRAConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) ldm.adapter.{unknown[0]}; allowed: {', '.join(sorted(known))}")
    config_dict = {k: v for k, v in stored.items() if k != "init_from"}  # the weights are in the file
    try:
        config = LoRAConfig(**config_dict)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: ldm.adapter: {err}") from err
    roots = {"unet": bundle.unet, "text_encoder": bundle.text_encoder}
    network = LoRANetwork.build(roots, config)
    state = ckpt["state_dict"]
    ema_state = _sub_state(state, "ema.model.")
    lora_state = ema_state if (use_ema and ema_state) else _sub_state(state, "lora.")
    load_into(network, lora_state, source=f"{path} ({'EMA' if use_ema and ema_state else 'raw'} adapter)")
    network.merge_into(roots)
    bundle.source = str(path)
    bundle.meta.update({"global_step": ckpt.get("global_step"), "ema": bool(use_ema and ema_state),
                        "model_config": model_cfg, "resolution": model_cfg.get("resolution"), "adapter": config_dict})
    return bundle.eval()
