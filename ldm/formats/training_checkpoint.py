"""Read our Lightning training checkpoints back as a ModelBundle (EMA weights by default), and fill configured
modules from any pretrained source (``model.pretrained``; a LoRA run's checkpoint needs it for its base)."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ldm.models.bundle import ModelBundle
from ldm.formats.common import strip_prefix
from ldm.formats.detect import detect_source
from ldm.formats.diffusers_folder import HUB_PATTERNS, load_diffusers_folder
from ldm.formats.weight_folder import cached_hub_folder
from ldm.formats.ldm_bundle import load_ldm_bundle_into
from ldm.formats.safe_load import CheckpointError, load_into, load_pickle
from ldm.formats.sharded_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint
from ldm.formats.single_file import load_single_file
from ldm.formats.flux_folder import load_flux_folder_into
from ldm.formats.sd3_folder import hub_folder, load_sd3_folder_into, transformer_pipeline
from ldm.formats.sd3_single_file import load_sd3_file_into
from ldm.formats.safe_build import build_node, check_plain, check_stored

MAX_BASES = 8  # a LoRA / textual-inversion run's base may itself be such a run's checkpoint: at most this deep
_LOADING: ContextVar[tuple[Path, ...]] = ContextVar("ldm_training_checkpoints_loading", default=())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True (never unpickle code; memory-mapped); a clear error for anything else.
    The stored run config (``ldm``) is bounded before anything walks it (``check_stored``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:  # a folder: trainer=fsdp2's sharded checkpoint, read into the same dict
        ckpt = read_sharded_checkpoint(path) if is_sharded_checkpoint(path) else load_pickle(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "ldm" not in ckpt:
        raise CheckpointError(f"{path}: not an ldm training checkpoint (no 'state_dict'/'ldm' entries)")
    if not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"{path}: state_dict must be a mapping of tensors")
    check_stored(ckpt["ldm"], source=str(path), key="ldm")
    return ckpt


@contextmanager
def _base_chain(path: Path) -> Iterator[None]:
    """Loading ``path`` while the checkpoints that named it as their base are being loaded: a checkpoint whose
    ``pretrained`` names itself, or a cycle of them, or a chain deeper than MAX_BASES is refused, not recursed."""
    chain = _LOADING.get()
    here = path.resolve()
    if here in chain:
        loop = " -> ".join(str(p) for p in (*chain[chain.index(here):], here))
        raise CheckpointError(f"{path}: ldm.model.model.pretrained leads back to this checkpoint ({loop}); refused")
    if len(chain) >= MAX_BASES:
        raise CheckpointError(f"{path}: ldm.model.model.pretrained chains through more than {MAX_BASES} training "
                              f"checkpoints ({' -> '.join(str(p) for p in chain)}); refused")
    token = _LOADING.set((*chain, here))
    try:
        yield
    finally:
        _LOADING.reset(token)


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
    default for sampling).

    The U-Net and autoencoder are built on the meta device: the sizes the stored config states get memory only
    once the weights (this file's, or the base's) have been checked to fill them (``load_into``)."""
    with _base_chain(Path(path)):
        return _load_training_checkpoint(Path(path), use_ema)


def _load_training_checkpoint(path: Path, use_ema: bool) -> ModelBundle:
    ckpt = read_checkpoint(path)
    model_cfg, m = _model_config(ckpt, path)
    src = str(path)
    schedule = build_node(model_cfg.get("schedule"), "schedule", source=src, key="ldm.model.schedule")
    unet = build_node(m.get("unet"), "unet", source=src, key="ldm.model.model.unet", meta=True)
    autoencoder = build_node(m.get("autoencoder"), "autoencoder", source=src, key="ldm.model.model.autoencoder",
                             meta=True)
    text_encoder = build_node(m.get("text_encoder"), "text_encoder", source=src, key="ldm.model.model.text_encoder")
    if ckpt["ldm"].get("adapter"):
        return _load_adapter_checkpoint(path, ckpt, use_ema, model_cfg, (unet, autoencoder, text_encoder, schedule))
    if ckpt["ldm"].get("controlnet"):
        return _load_controlnet_run_base(path, ckpt, model_cfg, (unet, autoencoder, text_encoder, schedule))
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


def _load_base(path: Path, model_cfg: dict, networks: tuple, run: str) -> None:
    """Fill the networks built from a LoRA / textual-inversion run's stored config from its base
    (``model.pretrained``); every tensor the stored config sized must then hold the base's values."""
    unet, autoencoder, text_encoder, _ = networks
    pretrained = model_cfg["model"].get("pretrained")
    check_plain(pretrained, source=str(path), key="ldm.model.model.pretrained")
    if not pretrained or not isinstance(pretrained, str):
        raise CheckpointError(f"{path}: a {run} checkpoint needs its base: ldm.model.model.pretrained must name "
                              f"it, got {pretrained!r}")
    load_weights_into(pretrained, unet, autoencoder, text_encoder, named_by=str(path))
    for name, module in (("unet", unet), ("autoencoder", autoencoder)):
        left = [k for k, t in module.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise CheckpointError(f"{path}: its base {pretrained} holds no values for {name} {left[:5]}")


def _adapter_config(path: Path, stored: Any):
    """The LoRAConfig a LoRA run stored: plain data, known keys, bounded values (LoRAConfig's own checks)."""
    from dataclasses import fields

    from ldm.models.lora import LoRAConfig

    check_plain(stored, source=str(path), key="ldm.adapter")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: ldm.adapter must be a mapping, got {type(stored).__name__}")
    known = {f.name for f in fields(LoRAConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) ldm.adapter.{unknown[0]}; allowed: {', '.join(sorted(known))}")
    config_dict = {k: v for k, v in stored.items() if k != "init_from"}  # the weights are in the file
    try:
        return LoRAConfig(**config_dict), config_dict
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: ldm.adapter: {err}") from err


def _load_adapter_checkpoint(path: Path, ckpt: dict[str, Any], use_ema: bool, model_cfg: dict,
                             networks: tuple) -> ModelBundle:
    """A LoRA run's checkpoint holds only the adapter: load the base (built safely from the stored config) from
    model.pretrained, then merge the (EMA) adapter into it. The adapter config is checked as plain data, and the
    adapter is built on the meta device: its stored ranks get memory only once this file's tensors fill them."""
    from ldm.models.lora import LoRANetwork

    config, config_dict = _adapter_config(path, ckpt["ldm"]["adapter"])
    _load_base(path, model_cfg, networks, "LoRA run's")
    unet, autoencoder, text_encoder, schedule = networks
    roots = {"unet": unet, "text_encoder": text_encoder}
    _as_trained_on(path, model_cfg["model"].get("quantize_base"), roots)
    try:
        with torch.device("meta"):
            network = LoRANetwork.build(roots, config)
    except ValueError as err:
        raise CheckpointError(f"{path}: ldm.adapter: {err}") from err
    lora_state, ema = trained_weights(ckpt["state_dict"], "lora.", use_ema)
    load_into(network, lora_state, source=f"{path} ({'EMA' if ema else 'raw'} adapter)")
    network.merge_into(roots)
    meta = {"global_step": ckpt.get("global_step"), "ema": ema, "model_config": model_cfg,
            "resolution": model_cfg.get("resolution"), "adapter": config_dict}
    return ModelBundle(unet, autoencoder, text_encoder, schedule, source=str(path), meta=meta).eval()


def _as_trained_on(path: Path, precision: Any, roots: dict[str, nn.Module | None]) -> None:
    """A run on a base stored quantized (model.quantize_base) trained its adapter on the quantized weights: the base
    is quantized the same way (deterministic) and dequantized, so the adapter is merged into the weights it learned
    on and the model samples as the run's previews did (on the plain base the adapter also corrects a quantization
    error that is not there: a LoRA trained on an NF4 shapes base drew 39.6% of the old colours right on the fp32
    base, 93.8% on its own)."""
    if precision is None:
        return
    from ldm.models.quantized_base import PRECISIONS, dequantize_, quantize_base_

    if precision not in PRECISIONS:
        raise CheckpointError(f"{path}: ldm.model.model.quantize_base must be null or one of {PRECISIONS}, got "
                              f"{precision!r}")
    for network in roots.values():
        if network is not None:
            quantize_base_(network, precision)
            dequantize_(network)


def _load_controlnet_run_base(path: Path, ckpt: dict[str, Any], model_cfg: dict, networks: tuple) -> ModelBundle:
    """A ControlNet run's checkpoint holds only the ControlNet: the model is its base, from model.pretrained (the
    ControlNet itself is sampled from the files the run wrote: sample.py controlnet=<run>/controlnet)."""
    stored = ckpt["ldm"]["controlnet"]
    check_plain(stored, source=str(path), key="ldm.controlnet")
    _load_base(path, model_cfg, networks, "ControlNet run's")
    unet, autoencoder, text_encoder, schedule = networks
    return ModelBundle(unet, autoencoder, text_encoder, schedule, source=str(path),
                       meta={"global_step": ckpt.get("global_step"), "model_config": model_cfg,
                             "resolution": model_cfg.get("resolution"), "controlnet": dict(stored)}).eval()


def _load_textual_inversion_checkpoint(path: Path, ckpt: dict[str, Any], use_ema: bool, model_cfg: dict,
                                       networks: tuple) -> ModelBundle:
    """A textual-inversion run's checkpoint holds only the placeholder's vectors: the base from model.pretrained,
    then the (EMA) vectors added as the placeholder's tokens (``ldm.models.textual_inversion``)."""
    from ldm.models.textual_inversion import add_token_rows, placeholder_tokens

    stored = ckpt["ldm"]["textual_inversion"]
    check_plain(stored, source=str(path), key="ldm.textual_inversion")
    token = stored.get("placeholder_token") if isinstance(stored, dict) else None
    if not isinstance(token, str) or not token:
        raise CheckpointError(f"{path}: ldm.textual_inversion.placeholder_token must be a token string")
    _load_base(path, model_cfg, networks, "textual-inversion run's")
    unet, autoencoder, text_encoder, schedule = networks
    weights, ema = trained_weights(ckpt["state_dict"], "textual_inversion.", use_ema)
    vectors = weights.get("vectors")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2:
        raise CheckpointError(f"{path}: no textual-inversion vectors [n, dim] in its state_dict")
    try:
        add_token_rows(text_encoder, placeholder_tokens(token, vectors.shape[0]), vectors)
    except ValueError as err:
        raise CheckpointError(f"{path}: ldm.textual_inversion.placeholder_token: {err}") from err
    return ModelBundle(unet, autoencoder, text_encoder, schedule, source=str(path),
                       meta={"global_step": ckpt.get("global_step"), "ema": ema, "model_config": model_cfg,
                             "resolution": model_cfg.get("resolution"), "textual_inversion": dict(stored)}).eval()


def load_weights_into(source, unet: nn.Module, autoencoder: nn.Module | None = None,
                      text_encoder: nn.Module | None = None, *, use_ema: bool = False,
                      named_by: str | None = None) -> str:
    """Fill existing modules (fine-tuning: ``model.pretrained``) from ``source``, told apart by ``detect_source``:
    an ldm bundle, a diffusers folder / hub id (SD, SD3, FLUX.1), an SD / SD3 single file or one of our training
    checkpoints. Each module
    is checked before anything is copied into it. Returns the source kind.

    named_by: the file that names ``source`` (a LoRA run's checkpoint naming its base): a hub id is then taken only
    from this machine's hub cache, never downloaded."""
    kind = detect_source(source)
    if kind == "hub" and named_by is not None:
        source = cached_hub_folder(str(source), HUB_PATTERNS, source=named_by, key="ldm.model.model.pretrained")
        kind = transformer_pipeline(source) or "diffusers"
    elif kind == "hub":
        source, kind = hub_folder(source)
    if kind == "ldm_bundle":
        load_ldm_bundle_into(source, unet, autoencoder, text_encoder)
    elif kind in ("diffusers", "hub"):
        load_diffusers_folder(str(source), unet=unet, vae=autoencoder, text_encoder=text_encoder)
    elif kind == "sd_single_file":
        load_single_file(str(source), unet, vae=autoencoder, text_encoder=text_encoder, use_ema=use_ema)
    elif kind == "sd3_diffusers":
        load_sd3_folder_into(source, unet, autoencoder, text_encoder)
    elif kind == "flux_diffusers":
        load_flux_folder_into(source, unet, autoencoder, text_encoder)
    elif kind == "sd3_single_file":
        load_sd3_file_into(source, unet, autoencoder, text_encoder)
    else:  # a run of ours (e.g. the base of a LoRA run): its EMA weights, strictly
        loaded = load_training_checkpoint(source, use_ema=True)
        for name, module, weights in (("unet", unet, loaded.unet), ("autoencoder", autoencoder, loaded.autoencoder),
                                      ("text_encoder", text_encoder, loaded.text_encoder)):
            if module is not None:
                _check_same_architecture(module, weights, name, source)
                load_into(module, weights.state_dict(), source=f"{source} ({name})")
    return kind


RUNTIME_FIELDS = ("gradient_checkpointing", "dropout")  # how a network runs, not what its weights mean


def _check_same_architecture(module: nn.Module, stored: nn.Module, name: str, source) -> None:
    """A run of ours as ``model.pretrained``: the configured U-Net / VAE must be the run's, field for field (a
    data=folder run's first stage trains a narrower VAE than model=shapes builds; a VAE's scaling_factor or a U-Net's
    head split changes no tensor shape but every output): name the keys to set. The text encoder is left to the
    strict load (its config holds options of use, such as max_chunks)."""
    if name == "text_encoder":
        return
    ours, theirs = getattr(module, "config", None), getattr(stored, "config", None)
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        return

    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    fixes = [f"++model.{name}.{k}={plain(theirs[k])}".replace(" ", "").replace("'", "") for k in sorted(theirs)
             if k in ours and k not in RUNTIME_FIELDS and plain(ours[k]) != plain(theirs[k])]
    if fixes and name == "autoencoder":  # the run's VAE comes from model.pretrained, not a file of its own
        fixes.append("++model.autoencoder.weights=null")
    if fixes:
        raise CheckpointError(f"{source}: its {name} is not the one model.{name} builds: set {' '.join(fixes)} "
                              "(as the run that wrote it: its .hydra/config.yaml)")
