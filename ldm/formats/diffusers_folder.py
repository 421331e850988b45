"""diffusers-format model folders (``unet/``, ``vae/``, ``text_encoder/``, ...).

Reads a local folder laid out like a hub repo (or a hub id, fetched with
``huggingface_hub.snapshot_download``; respects ``HF_HUB_OFFLINE``), builds or
fills our models, and writes our models back in that layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldm.formats.diffusers_keys import (
    unet_config_from_diffusers,
    unet_diffusers_config,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_config_from_diffusers,
    vae_diffusers_config,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)
from ldm.formats.safe_load import CheckpointError, load_into, load_state_dict
from ldm.formats.safe_build import build_network, check_plain, read_clip_text_config

COMPONENTS = ("unet", "vae", "text_encoder")
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}
SCHEDULER_OPTIONAL = ("timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "clip_sample",
                      "set_alpha_to_one")
# Bookkeeping keys diffusers writes into config.json (never read here); any other "_" key (_target_, ...) is refused.
DIFFUSERS_METADATA = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
_HUB_PATTERNS = ["*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"]


def resolve_folder(path_or_hub_id) -> Path:
    """A local folder as is; otherwise download the needed files of a hub repo."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_hub_id), allow_patterns=_HUB_PATTERNS))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read JSON config ({err})") from err


def weights_file(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    """Weight files of a component folder: single file or the shards of an index."""
    name = f"{stem}.{variant}" if variant else stem
    for suffix in (".safetensors", ".bin"):
        if (folder / (name + suffix)).is_file():
            return [folder / (name + suffix)]
        index = folder / f"{name}{suffix}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no {name}.safetensors or {name}.bin weights")


def read_weights(folder: Path, stem: str, variant: str | None = None) -> dict:
    state = {}
    for file in weights_file(folder, stem, variant):
        state.update(load_state_dict(file))
    return state


def read_scheduler_config(folder) -> dict:
    """Training-relevant fields of ``scheduler/scheduler_config.json`` (defaults if absent)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    cfg = _read_json(path) if path.is_file() else {}
    out = {k: cfg.get(k, v) for k, v in SCHEDULER_DEFAULTS.items()}
    out.update({k: cfg[k] for k in SCHEDULER_OPTIONAL if k in cfg})
    return out


def load_diffusers_folder(path_or_hub_id, unet=None, vae=None, text_encoder=None,
                          components=COMPONENTS, strict: bool = True, variant: str | None = None) -> dict:
    """Load a diffusers folder into our models, building those not given.

    Returns ``{"unet", "vae", "text_encoder", "scheduler"}`` (components not in
    ``components`` or absent from the folder are ``None``); ``scheduler`` is
    ``read_scheduler_config``'s dict.
    """
    folder = resolve_folder(path_or_hub_id)
    given = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    out = {"scheduler": read_scheduler_config(folder)}
    for name in COMPONENTS:
        module = given[name]
        sub = folder / name
        if name not in components or (module is None and not sub.is_dir()):
            out[name] = module
            continue
        if not sub.is_dir():
            raise CheckpointError(f"{folder}: no {name}/ folder to load into the given {name}")
        out[name] = _LOADERS[name](sub, module, strict, variant)
    return out


def _converted(convert, sub: Path) -> dict:
    """Our constructor arguments from a component's ``config.json`` (a file: plain values checked first)."""
    path = sub / "config.json"
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    check_plain({k: v for k, v in config.items() if k not in DIFFUSERS_METADATA}, source=str(path), key="config")
    try:
        return convert(config)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unsupported config ({type(err).__name__}: {err})") from err


def _load_unet(sub: Path, unet, strict: bool, variant):
    if unet is None:
        unet = build_network("unet", _converted(unet_config_from_diffusers, sub), source=str(sub / "config.json"),
                             key="unet")
    state = unet_diffusers_to_ldm(read_weights(sub, "diffusion_pytorch_model", variant), unet.config)
    load_into(unet, state, source=str(sub), strict=strict)
    return unet


def _load_vae(sub: Path, vae, strict: bool, variant):
    if vae is None:
        vae = build_network("autoencoder", _converted(vae_config_from_diffusers, sub),
                            source=str(sub / "config.json"), key="vae")
    state = vae_diffusers_to_ldm(read_weights(sub, "diffusion_pytorch_model", variant), vae.config)
    load_into(vae, state, source=str(sub), strict=strict)
    return vae


def _load_text_encoder(sub: Path, text_encoder, strict: bool, variant):
    from ldm.models.text_encoder import CLIPTextEncoder, to_module_keys

    if text_encoder is None:
        read_clip_text_config(sub)  # sizes checked before transformers allocates them
        return CLIPTextEncoder.from_pretrained(sub.parent)
    model = getattr(text_encoder, "model", text_encoder)
    state = to_module_keys(read_weights(sub, "model", variant), model)
    load_into(model, state, source=str(sub), strict=strict)
    return text_encoder


_LOADERS = {"unet": _load_unet, "vae": _load_vae, "text_encoder": _load_text_encoder}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_diffusers_folder(folder, unet=None, vae=None, text_encoder=None, scheduler: dict | None = None,
                          sample_size: int | None = None) -> Path:
    """Write our models as a diffusers folder (configs + ``*.safetensors``).

    ``scheduler`` (e.g. ``{"beta_schedule": "scaled_linear", ...}``) is written
    as a ``DDPMScheduler`` config. ``sample_size`` is the latent size for the UNet.
    """
    from safetensors.torch import save_file

    folder = Path(folder)

    def save(sub: str, state: dict, stem: str) -> None:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(tensors, str(folder / sub / f"{stem}.safetensors"), metadata={"format": "pt"})

    if unet is not None:
        _write_json(folder / "unet" / "config.json", unet_diffusers_config(unet.config, sample_size))
        save("unet", unet_ldm_to_diffusers(unet.state_dict(), unet.config), "diffusion_pytorch_model")
    if vae is not None:
        size = sample_size * 2 ** (len(vae.config["channel_mult"]) - 1) if sample_size else None
        _write_json(folder / "vae" / "config.json", vae_diffusers_config(vae.config, size))
        save("vae", vae_ldm_to_diffusers(vae.state_dict(), vae.config), "diffusion_pytorch_model")
    if text_encoder is not None:
        from ldm.models.text_encoder import to_hub_keys

        model = getattr(text_encoder, "model", text_encoder)
        model.config.save_pretrained(folder / "text_encoder")
        save("text_encoder", to_hub_keys(model.state_dict()), "model")  # hub key names
        tokenizer = getattr(text_encoder, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / "tokenizer")
    if scheduler is not None:
        cfg = {"_class_name": "DDPMScheduler", **{k: scheduler.get(k, v) for k, v in SCHEDULER_DEFAULTS.items()}}
        cfg.update({k: scheduler[k] for k in SCHEDULER_OPTIONAL if k in scheduler})
        _write_json(folder / "scheduler" / "scheduler_config.json", cfg)
    return folder
