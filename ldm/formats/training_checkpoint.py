"""Read our Lightning training checkpoints back as a ModelBundle (EMA weights by default), and fill configured
modules from any pretrained source (``model.pretrained``; a LoRA run's checkpoint needs it for its base)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.models.bundle import ModelBundle
from ldm.formats.common import strip_prefix
from ldm.formats.detect import detect_source
from ldm.formats.diffusers_folder import load_diffusers_folder
from ldm.formats.ldm_bundle import load_ldm_bundle_into
from ldm.formats.safe_load import CheckpointError, load_into
from ldm.formats.single_file import load_single_file
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


def trained_weights(state: dict[str, torch.Tensor], prefix: str, use_ema: bool) -> tuple[dict, bool]:
    """The trained network's weights: the EMA copy (``ema.model.*``) when asked for and kept, else ``prefix*``.
    Returns (weights, whether they are the EMA copy)."""
    ema_state = strip_prefix(state, "ema.model.")
    if use_ema and ema_state:
        return ema_state, True
    return strip_prefix(state, prefix), False


def load_training_checkpoint(path: str | Path, use_ema: bool = True) -> ModelBundle:
    """Rebuild the networks from the model config saved in the checkpoint and load its weights strictly.

    The stored config is data: only our own classes, with plain bounded arguments, are built from it
    (``ldm.formats.safe_build``); nothing it names is imported or called.
    use_ema: take the U-Net weights (and a trained text encoder's) from the EMA copy when the run kept one (the
    default for sampling)."""
    ckpt = read_checkpoint(path)
    model_cfg, m = _model_config(ckpt, path)
    src = str(path)
    schedule = build_node(model_cfg.get("schedule"), "schedule", source=src, key="ldm.model.schedule")
    unet = build_node(m.get("unet"), "unet", source=src, key="ldm.model.model.unet")
    autoencoder = build_node(m.get("autoencoder"), "autoencoder", source=src, key="ldm.model.model.autoencoder")
    text_encoder = build_node(m.get("text_encoder"), "text_encoder", source=src, key="ldm.model.model.text_encoder")
    if ckpt["ldm"].get("adapter"):
        return _load_adapter_checkpoint(path, ckpt, use_ema, model_cfg, (unet, autoencoder, text_encoder, schedule))
    if ckpt["ldm"].get("textual_inversion"):
        return _load_textual_inversion_checkpoint(path, ckpt, use_ema, model_cfg,
                                                  (unet, autoencoder, text_encoder, schedule))
    state = ckpt["state_dict"]
    unet_state, ema = trained_weights(state, "unet.", use_ema)
    load_into(unet, unet_state, source=f"{path} ({'EMA' if ema else 'raw'} U-Net)")
    load_into(autoencoder, strip_prefix(state, "autoencoder."), source=f"{path} (autoencoder)")
    text_state, text_ema = strip_prefix(state, "ema_text.model."), True  # a text encoder that trained kept an EMA
    if not (use_ema and text_state):
        text_state, text_ema = strip_prefix(state, "text_encoder."), False
    if text_state:
        load_into(text_encoder, text_state, source=f"{path} ({'EMA' if text_ema else 'raw'} text encoder)")
    if getattr(text_encoder, "frozen", None) is False:  # trained with frozen=false; loaded for use: frozen, cached
        text_encoder.frozen = True
        text_encoder.requires_grad_(False)
    bundle = ModelBundle(unet, autoencoder, text_encoder, schedule, source=str(path),
                         meta={"global_step": ckpt.get("global_step"), "ema": ema,
                               "model_config": model_cfg, "resolution": model_cfg.get("resolution")})
    return bundle.eval()


def _load_adapter_checkpoint(path: Path, ckpt: dict[str, Any], use_ema: bool, model_cfg: dict,
                             networks: tuple) -> ModelBundle:
    """A LoRA run's checkpoint holds only the adapter: load the base (built safely from the stored config) from
    model.pretrained, then merge the (EMA) adapter into it. The adapter config is checked as plain data."""
    from dataclasses import fields

    from ldm.formats.safe_build import check_plain
    from ldm.models.lora import LoRAConfig, LoRANetwork
    unet, autoencoder, text_encoder, schedule = networks
    pretrained = model_cfg["model"].get("pretrained")
    check_plain(pretrained, source=str(path), key="ldm.model.model.pretrained")
    if not pretrained:
        raise CheckpointError(f"{path}: a LoRA run's checkpoint needs its base: ldm.model.model.pretrained is empty")
    load_weights_into(pretrained, unet, autoencoder, text_encoder)
    bundle = ModelBundle(unet, autoencoder, text_encoder, schedule, source=str(path))
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
    lora_state, ema = trained_weights(ckpt["state_dict"], "lora.", use_ema)
    load_into(network, lora_state, source=f"{path} ({'EMA' if ema else 'raw'} adapter)")
    network.merge_into(roots)
    bundle.source = str(path)
    bundle.meta.update({"global_step": ckpt.get("global_step"), "ema": ema,
                        "model_config": model_cfg, "resolution": model_cfg.get("resolution"), "adapter": config_dict})
    return bundle.eval()

def _load_textual_inversion_checkpoint(path: Path, ckpt: dict[str, Any], use_ema: bool, model_cfg: dict,
                                       networks: tuple) -> ModelBundle:
    """A textual-inversion run's checkpoint holds only the placeholder's vectors: the base from model.pretrained,
    then the (EMA) vectors added as the placeholder's tokens (``ldm.models.textual_inversion``)."""
    from ldm.formats.safe_build import check_plain
    from ldm.models.textual_inversion import add_token_rows, placeholder_tokens

    unet, autoencoder, text_encoder, schedule = networks
    pretrained = model_cfg["model"].get("pretrained")
    stored = ckpt["ldm"]["textual_inversion"]
    check_plain(pretrained, source=str(path), key="ldm.model.model.pretrained")
    check_plain(stored, source=str(path), key="ldm.textual_inversion")
    if not pretrained:
        raise CheckpointError(f"{path}: a textual-inversion checkpoint needs its base: ldm.model.model.pretrained "
                              "is empty")
    token = stored.get("placeholder_token") if isinstance(stored, dict) else None
    if not isinstance(token, str) or not token:
        raise CheckpointError(f"{path}: ldm.textual_inversion.placeholder_token must be a token string")
    load_weights_into(pretrained, unet, autoencoder, text_encoder)
    weights, ema = trained_weights(ckpt["state_dict"], "textual_inversion.", use_ema)
    vectors = weights.get("vectors")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2:
        raise CheckpointError(f"{path}: no textual-inversion vectors [n, dim] in its state_dict")
    try:
        add_token_rows(text_encoder, placeholder_tokens(token, vectors.shape[0]), vectors)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return ModelBundle(unet, autoencoder, text_encoder, schedule, source=str(path),
                       meta={"global_step": ckpt.get("global_step"), "ema": ema, "model_config": model_cfg,
                             "resolution": model_cfg.get("resolution"), "textual_inversion": dict(stored)}).eval()


def load_weights_into(source, unet: nn.Module, autoencoder: nn.Module | None = None,
                      text_encoder: nn.Module | None = None, *, use_ema: bool = False) -> str:
    """Fill existing modules (fine-tuning: ``model.pretrained``) from ``source``, told apart by ``detect_source``:
    an ldm bundle, a diffusers folder / hub id, an SD single file or one of our training checkpoints. Each module
    is checked before anything is copied into it. Returns the source kind."""
    kind = detect_source(source)
    if kind == "ldm_bundle":
        load_ldm_bundle_into(source, unet, autoencoder, text_encoder)
    elif kind in ("diffusers", "hub"):
        load_diffusers_folder(str(source), unet=unet, vae=autoencoder, text_encoder=text_encoder)
    elif kind == "sd_single_file":
        load_single_file(str(source), unet, vae=autoencoder, text_encoder=text_encoder, use_ema=use_ema)
    else:  # a run of ours (e.g. the base of a LoRA run): its EMA weights, strictly
        loaded = load_training_checkpoint(source, use_ema=True)
        for name, module, weights in (("unet", unet, loaded.unet), ("autoencoder", autoencoder, loaded.autoencoder),
                                      ("text_encoder", text_encoder, loaded.text_encoder)):
            if module is not None:
                load_into(module, weights.state_dict(), source=f"{source} ({name})")
    return kind
