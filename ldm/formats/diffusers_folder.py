"""diffusers-format model folders (``unet/``, ``vae/``, ``text_encoder/``, ...), reader and writer.

Reads a local folder laid out like a hub repo (or a hub id, fetched with
``huggingface_hub.snapshot_download``; respects ``HF_HUB_OFFLINE``), builds or
fills our models, and writes our models back in that layout (``write_diffusers``: a whole
``StableDiffusionPipeline``; ``save_diffusers_folder``: any of its components).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.formats.common import (
    DIFFUSERS_BETA_SCHEDULES,
    _no_checkpointing,
    check_sd_layout,
    cast_state,
    check_schedule,
    save_safetensors,
    text_model,
    write_json,
)

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
from ldm.formats.safe_load import CheckpointError, load_into, read_json_file
from ldm.formats.safe_build import SCHEDULE_SCHEMA, build_network, check_kwargs, check_plain
from ldm.formats.weight_folder import check_text_encoder_folder, read_weights

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
HUB_PATTERNS = ["*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors",
                "text_encoder_2/*.safetensors",
                # SD3 / SD3.5 (ldm.formats.sd3_folder): the MMDiT, the T5 and its sentencepiece tokenizer
                "transformer/*.safetensors", "text_encoder_3/*.safetensors", "tokenizer_3/*.model",
                "tokenizer_2/*.model"]  # FLUX.1's T5 tokenizer (ldm.formats.flux_folder)


def resolve_folder(path_or_hub_id) -> Path:
    """A local folder as is; otherwise download the needed files of a hub repo."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_hub_id), allow_patterns=HUB_PATTERNS))


def _read_json(path: Path) -> dict:
    return read_json_file(path)  # bounded: size, nesting


# diffusers' scheduler fields -> the NoiseSchedule.make arguments whose bounds (SCHEDULE_SCHEMA) they must meet
_SCHEDULE_FIELDS = {"num_train_timesteps": "num_train_timesteps", "beta_start": "beta_start", "beta_end": "beta_end",
                    "prediction_type": "prediction_type", "rescale_betas_zero_snr": "rescale_zero_terminal_snr"}


def read_scheduler_config(folder) -> dict:
    """Training-relevant fields of ``scheduler/scheduler_config.json`` (defaults if absent), within the bounds of
    a stored schedule (e.g. at most 100,000 timesteps: the schedule's tables are allocated from this number)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    cfg = _read_json(path) if path.is_file() else {}
    out = {k: cfg.get(k, v) for k, v in SCHEDULER_DEFAULTS.items()}
    out.update({k: cfg[k] for k in SCHEDULER_OPTIONAL if k in cfg})
    check_kwargs({ours: out[k] for k, ours in _SCHEDULE_FIELDS.items() if k in out}, SCHEDULE_SCHEMA,
                 source=str(path), key="scheduler")
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


def _network_loader(role: str, key: str, config_from_diffusers, to_ldm):
    """Build (if not given) and fill a U-Net / VAE from ``<sub>/config.json`` + its diffusers weights."""

    def load(sub: Path, module, strict: bool, variant):
        if module is None:  # on the meta device: memory only once the weights are checked against it (load_into)
            module = build_network(role, _converted(config_from_diffusers, sub), source=str(sub / "config.json"),
                                   key=key, meta=True)
        state = to_ldm(read_weights(sub, "diffusion_pytorch_model", variant), module.config)
        load_into(module, state, source=str(sub), strict=strict)
        return module

    return load


_load_unet = _network_loader("unet", "unet", unet_config_from_diffusers, unet_diffusers_to_ldm)
_load_vae = _network_loader("autoencoder", "vae", vae_config_from_diffusers, vae_diffusers_to_ldm)


def _load_text_encoder(sub: Path, text_encoder, strict: bool, variant):
    from ldm.models.text_encoder import CLIPTextEncoder, to_module_keys

    if (sub.parent / "text_encoder_2").is_dir():  # SDXL: ViT-L + bigG
        return _load_dual_text_encoder(sub.parent, text_encoder, strict, variant)
    if text_encoder is None:
        check_text_encoder_folder(sub)  # sizes checked against the weights before transformers allocates them
        return CLIPTextEncoder.from_pretrained(sub.parent)
    model = text_model(text_encoder)
    state = to_module_keys(read_weights(sub, "model", variant), model)
    load_into(model, state, source=str(sub), strict=strict)
    return text_encoder


def _load_dual_text_encoder(folder: Path, text_encoder, strict: bool, variant):
    """``text_encoder/`` + ``text_encoder_2/`` (+ their tokenizers) of an SDXL folder -> DualCLIPTextEncoder."""
    from ldm.models.text_encoder import to_module_keys
    from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder

    if text_encoder is None:
        for name in ("text_encoder", "text_encoder_2"):  # sizes checked against the weights, before allocation
            check_text_encoder_folder(folder / name, projection=name == "text_encoder_2")
        for name in ("tokenizer", "tokenizer_2"):
            if not (folder / name).is_dir():
                raise CheckpointError(f"{folder}: an SDXL folder needs {name}/ beside text_encoder_2/")
        return DualCLIPTextEncoder.from_pretrained(folder)
    if not isinstance(text_encoder, DualCLIPTextEncoder):
        raise CheckpointError(f"{folder}: an SDXL folder (text_encoder_2/) needs a DualCLIPTextEncoder to load into, "
                              f"got {type(text_encoder).__name__}")
    load_into(text_encoder.model, to_module_keys(read_weights(folder / "text_encoder", "model", variant),
                                                 text_encoder.model), source=str(folder / "text_encoder"), strict=strict)
    state_2 = {k: v for k, v in read_weights(folder / "text_encoder_2", "model", variant).items()
               if not k.endswith("position_ids")}
    load_into(text_encoder.model_2, state_2, source=str(folder / "text_encoder_2"), strict=strict)
    return text_encoder


_LOADERS = {"unet": _load_unet, "vae": _load_vae, "text_encoder": _load_text_encoder}


def _write_component(folder: Path, name: str, config: dict, state: dict, dtype: torch.dtype | None = None) -> None:
    """``<name>/config.json`` + ``<name>/diffusion_pytorch_model.safetensors`` (diffusers key names)."""
    write_json(folder / name / "config.json", config)
    save_safetensors(cast_state(state, dtype), folder / name / "diffusion_pytorch_model.safetensors")


def save_diffusers_folder(folder, unet=None, vae=None, text_encoder=None, scheduler: dict | None = None,
                          sample_size: int | None = None) -> Path:
    """Write any of our models as diffusers components (configs + ``*.safetensors``), with the writers
    ``write_diffusers`` uses.

    ``scheduler`` (e.g. ``{"beta_schedule": "scaled_linear", ...}``) is written
    as a ``DDPMScheduler`` config. ``sample_size`` is the latent size for the UNet.
    """
    folder = Path(folder)
    if unet is not None:
        _write_component(folder, "unet", unet_diffusers_config(unet.config, sample_size),
                         unet_ldm_to_diffusers(unet.state_dict(), unet.config))
    if vae is not None:
        size = sample_size * 2 ** (len(vae.config["channel_mult"]) - 1) if sample_size else None
        _write_component(folder, "vae", vae_diffusers_config(vae.config, size),
                         vae_ldm_to_diffusers(vae.state_dict(), vae.config))
    if text_encoder is not None:
        write_hub_text_encoder(text_encoder, folder, None)
    if scheduler is not None:
        cfg = {"_class_name": "DDPMScheduler", **{k: scheduler.get(k, v) for k, v in SCHEDULER_DEFAULTS.items()}}
        cfg.update({k: scheduler[k] for k in SCHEDULER_OPTIONAL if k in scheduler})
        write_json(folder / "scheduler" / "scheduler_config.json", cfg)
    return folder


_DIFFUSERS_BETAS = {v: k for k, v in DIFFUSERS_BETA_SCHEDULES.items()}  # diffusers' name -> ours


def schedule_from_diffusers(cfg: dict) -> NoiseSchedule:
    """``read_scheduler_config``'s dict -> NoiseSchedule."""
    kind = _DIFFUSERS_BETAS.get(cfg["beta_schedule"])
    if kind is None:
        raise ValueError(f"unsupported diffusers beta_schedule {cfg['beta_schedule']!r}; "
                         f"expected one of {sorted(_DIFFUSERS_BETAS)}")
    return NoiseSchedule.make(kind, cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"],
                              rescale_zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
                              prediction_type=cfg["prediction_type"])


def load_diffusers(source, *, text_encoder: nn.Module | None = None) -> ModelBundle:
    try:
        folder = resolve_folder(source)
    except Exception as err:  # offline, unknown repo, ...: huggingface_hub's many error types
        raise FileNotFoundError(f"model not found: {source} is no local folder and could not be fetched from the "
                                f"hub ({type(err).__name__}: {err})") from err
    components = ("unet", "vae") if text_encoder is not None else ("unet", "vae", "text_encoder")
    out = load_diffusers_folder(folder, components=components)
    missing = [c for c in components if out[c] is None]
    if missing:
        raise CheckpointError(f"{folder}: no {', '.join(m + '/' for m in missing)} folder"
                              + ("; pass text_encoder=<folder>" if missing == ["text_encoder"] else ""))
    te = text_encoder if text_encoder is not None else out["text_encoder"]
    meta: dict = {"format": "diffusers"}
    unet_cfg = folder / "unet" / "config.json"
    sample_size = _read_json(unet_cfg).get("sample_size") if unet_cfg.is_file() else None
    if isinstance(sample_size, int):
        meta["resolution"] = sample_size * out["vae"].downsample_factor
    if out["unet"].config.get("adm_in_channels"):  # SDXL: its VAE overflows in float16 unless fixed (force_upcast)
        vae_cfg = folder / "vae" / "config.json"
        meta["vae_fp32"] = _read_json(vae_cfg).get("force_upcast", True) is not False if vae_cfg.is_file() else True
    return ModelBundle(out["unet"], out["vae"], te, schedule_from_diffusers(out["scheduler"]),
                       source=str(source), meta=meta)

# diffusers' defaults for the betas of a cosine schedule (unused by squaredcos_cap_v2, but the field is a float).
_DIFFUSERS_BETA_DEFAULTS = (0.0001, 0.02)
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers whose classes read these configs (pyproject's floor)


def diffusers_scheduler_config(schedule: NoiseSchedule) -> dict:
    """A ``scheduler/scheduler_config.json``: the training schedule, with Stable Diffusion's inference settings.

    The betas, prediction type and zero-terminal-SNR rescale are the training schedule's. The inference fields are
    SD's own (``leading`` spacing, ``steps_offset`` 1, ``set_alpha_to_one`` false, no clipping): diffusers'
    ``StableDiffusionPipeline`` rewrites any other ``steps_offset`` to 1 anyway. Our DDIM reproduces them with
    ``make_timesteps(..., "leading", steps_offset=1)`` and ``ddim(..., final_alpha_one=False)``. Zero-terminal-SNR
    models get ``trailing`` spacing (Lin et al. 2023, sec. 3.3), without which sampling never starts at t = T - 1.
    ``skip_prk_steps`` makes ``PNDMScheduler.from_config`` run plain PLMS steps, as in SD's config.
    """
    check_schedule(schedule)
    start, end = schedule.beta_start, schedule.beta_end
    if start is None or end is None:
        start, end = _DIFFUSERS_BETA_DEFAULTS
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_schedule": DIFFUSERS_BETA_SCHEDULES[schedule.kind],
        "beta_start": float(start),
        "beta_end": float(end),
        "trained_betas": None,
        "prediction_type": schedule.prediction_type,
        "rescale_betas_zero_snr": bool(schedule.zero_terminal_snr),
        "timestep_spacing": "trailing" if schedule.zero_terminal_snr else "leading",
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "skip_prk_steps": True,
    }


def model_index() -> dict:
    """``model_index.json`` of a ``StableDiffusionPipeline`` without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_hub_text_encoder(text_encoder, folder: Path, dtype: torch.dtype | None,
                           drop_unused_last_layer: bool = False) -> list[str]:
    """``text_encoder/`` (config + ``model.safetensors`` in hub keys) and ``tokenizer/`` into ``folder``.

    drop_unused_last_layer: a ``penultimate`` encoder is written without its last block, so that the model's
    ``last_hidden_state`` (which passes the final LayerNorm) is our penultimate context, as diffusers' SD2
    folders do (23 of OpenCLIP's 24 blocks). Returns the written sub-folder names.
    """
    from ldm.models.text_encoder import to_hub_keys

    if hasattr(text_encoder, "model_2"):  # SDXL: + text_encoder_2/ and tokenizer_2/
        return _write_dual_text_encoder(text_encoder, folder, dtype)
    model = text_model(text_encoder)
    config = copy.deepcopy(model.config)
    state = to_hub_keys(model.state_dict())
    if drop_unused_last_layer and getattr(text_encoder, "penultimate", False):
        last = config.num_hidden_layers - 1
        state = {k: v for k, v in state.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}
        config.num_hidden_layers = last
    config.architectures = ["CLIPTextModel"]
    config.name_or_path = ""  # the folder it was loaded from (transformers 4.x writes it): not in a shared file
    stored = dtype or next(iter(state.values())).dtype
    if hasattr(config, "dtype"):
        config.dtype = stored
    else:  # transformers 4.x
        config.torch_dtype = stored
    (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder / "text_encoder"))
    save_safetensors(cast_state(state, dtype), folder / "text_encoder" / "model.safetensors")
    written = ["text_encoder/"]
    tokenizer = getattr(text_encoder, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        written.append("tokenizer/")
    return written


def _write_text_model(config, state: dict, out: Path, architecture: str, dtype: torch.dtype | None) -> None:
    config = copy.deepcopy(config)
    config.architectures = [architecture]
    config.name_or_path = ""  # as in write_hub_text_encoder
    stored = dtype or next(iter(state.values())).dtype
    if hasattr(config, "dtype"):
        config.dtype = stored
    else:  # transformers 4.x
        config.torch_dtype = stored
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_safetensors(cast_state(state, dtype), out / "model.safetensors")


def _write_dual_text_encoder(text_encoder, folder: Path, dtype: torch.dtype | None) -> list[str]:
    """SDXL's ``text_encoder/`` (CLIPTextModel) + ``text_encoder_2/`` (CLIPTextModelWithProjection) + tokenizers."""
    hub_1, hub_2 = text_encoder.hub_state_dicts()
    _write_text_model(text_encoder.model.config, hub_1, folder / "text_encoder", "CLIPTextModel", dtype)
    _write_text_model(text_encoder.model_2.config, hub_2, folder / "text_encoder_2", "CLIPTextModelWithProjection",
                      dtype)
    text_encoder.tokenizer.save_pretrained(str(folder / "tokenizer"))
    text_encoder.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
    return ["text_encoder/", "tokenizer/", "text_encoder_2/", "tokenizer_2/"]


def sdxl_model_index() -> dict:
    """``model_index.json`` of a ``StableDiffusionXLPipeline`` (zero unconditional text, no watermarker)."""
    index = {k: v for k, v in model_index().items()
             if k not in ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker")}
    return {**index, "_class_name": "StableDiffusionXLPipeline", "feature_extractor": [None, None],
            "image_encoder": [None, None], "force_zeros_for_empty_prompt": True,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"]}


def write_diffusers(bundle: ModelBundle, folder: Path, *, frozen: bool = True, dtype: torch.dtype | None = None,
                    resolution: int = 512) -> list[str]:
    """A ``StableDiffusionPipeline`` folder; ``frozen=False`` writes only ``unet/``, ``scheduler/`` and
    ``model_index.json``. Returns the written entries."""
    check_diffusers(bundle)
    folder = Path(folder)
    vae = bundle.autoencoder
    latent_size = resolution // vae.downsample_factor
    unet_cfg = _no_checkpointing(bundle.unet.config)
    _write_component(folder, "unet", unet_diffusers_config(unet_cfg, latent_size),
                     unet_ldm_to_diffusers(bundle.unet.state_dict(), unet_cfg), dtype)
    written = ["unet/"]
    sdxl = hasattr(bundle.text_encoder, "model_2")
    if frozen:
        vae_config = vae_diffusers_config(vae.config, resolution)
        if sdxl:  # SDXL's VAE overflows in float16: diffusers decodes it in float32
            vae_config["force_upcast"] = bool(bundle.meta.get("vae_fp32", True))
        _write_component(folder, "vae", vae_config, vae_ldm_to_diffusers(vae.state_dict(), vae.config),
                         None if sdxl and vae_config["force_upcast"] else dtype)
        written.append("vae/")
        written += write_hub_text_encoder(bundle.text_encoder, folder, dtype, drop_unused_last_layer=True)
    write_json(folder / "scheduler" / "scheduler_config.json", diffusers_scheduler_config(bundle.schedule))
    write_json(folder / "model_index.json", sdxl_model_index() if sdxl else model_index())
    return written + ["scheduler/", "model_index.json"]


def check_diffusers(bundle: ModelBundle) -> None:
    """What a StableDiffusionPipeline cannot represent, found before anything is written."""
    check_sd_layout(bundle, "a StableDiffusionPipeline")
