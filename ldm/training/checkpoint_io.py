"""Read our Lightning training checkpoints back as a ModelBundle (EMA weights by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from ldm.bundle import ModelBundle
from ldm.checkpoints.safe_load import CheckpointError, load_into


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


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_training_checkpoint(path: str | Path, use_ema: bool = True) -> ModelBundle:
    """Rebuild the networks from the model config saved in the checkpoint and load its weights strictly.

    use_ema: take the U-Net weights from the EMA copy when the run kept one (the default for sampling)."""
    ckpt = read_checkpoint(path)
    if ckpt["ldm"].get("adapter"):
        return _load_adapter_checkpoint(path, ckpt, use_ema)
    model_cfg = ckpt["ldm"]["model"]
    m, schedule = model_cfg["model"], instantiate(model_cfg["schedule"])
    unet, autoencoder, text_encoder = instantiate(m["unet"]), instantiate(m["autoencoder"]), instantiate(m["text_encoder"])
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


def _load_adapter_checkpoint(path: Path, ckpt: dict[str, Any], use_ema: bool) -> ModelBundle:
    """A LoRA run's checkpoint holds only the adapter: rebuild the base from its model config (model.pretrained),
    then merge the (EMA) adapter into it."""
    from ldm.models.lora import LoRAConfig, LoRANetwork
    from ldm.training.factories import build_bundle

    model_cfg = ckpt["ldm"]["model"]
    m, schedule = model_cfg["model"], instantiate(model_cfg["schedule"])
    bundle = build_bundle(instantiate(m["unet"]), instantiate(m["autoencoder"]), instantiate(m["text_encoder"]),
                          schedule, pretrained=m.get("pretrained"))
    roots = {"unet": bundle.unet, "text_encoder": bundle.text_encoder}
    config = {k: v for k, v in ckpt["ldm"]["adapter"].items() if k != "init_from"}  # the weights are in the file
    network = LoRANetwork.build(roots, LoRAConfig(**config))
    state = ckpt["state_dict"]
    ema_state = _sub_state(state, "ema.model.")
    lora_state = ema_state if (use_ema and ema_state) else _sub_state(state, "lora.")
    load_into(network, lora_state, source=f"{path} ({'EMA' if use_ema and ema_state else 'raw'} adapter)")
    network.merge_into(roots)
    bundle.source = str(path)
    bundle.meta.update({"global_step": ckpt.get("global_step"), "ema": bool(use_ema and ema_state),
                        "model_config": model_cfg, "resolution": model_cfg.get("resolution"), "adapter": config})
    return bundle.eval()
