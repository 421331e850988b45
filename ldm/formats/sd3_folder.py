"""A whole SD3 / SD3.5 diffusers folder (``StableDiffusion3Pipeline``), read and written:

    transformer/     SD3Transformer2DModel           <-> our MMDiT (``sd3_diffusers_keys``)
    vae/             AutoencoderKL, 16 latent channels, no quant convs (use_quant_conv / use_post_quant_conv
                     false), latent = (z - shift_factor) * scaling_factor
    text_encoder/    CLIPTextModelWithProjection (CLIP-L)        + tokenizer/
    text_encoder_2/  CLIPTextModelWithProjection (OpenCLIP bigG) + tokenizer_2/
    text_encoder_3/  T5EncoderModel (T5-XXL), optional            + tokenizer_3/   (without it the T5 tokens are
                     zeros, as diffusers' pipeline with text_encoder_3=None)
    scheduler/       FlowMatchEulerDiscreteScheduler: its shift (3.0) is our FlowMatching's
    model_index.json

Everything is read as bounded data: each config's sizes are checked (and the network counted on the meta device)
against the tensors its weight file holds before memory is allocated (``read_sd3_transformer``, ``build_network``,
``check_text_encoder_folder``, ``check_t5_folder``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.diffusion.flow import FlowMatching
from ldm.formats.common import ExportError, cast_state, save_safetensors, write_json
from ldm.formats.diffusers_folder import DIFFUSERS_METADATA, _converted, load_diffusers_folder, resolve_folder
from ldm.formats.diffusers_keys import vae_config_from_diffusers, vae_diffusers_config, vae_ldm_to_diffusers
from ldm.formats.safe_build import FLOW_SCHEDULE_TARGET, build_node, check_plain
from ldm.formats.safe_load import CheckpointError, load_into, read_json_file
from ldm.formats.sd3_diffusers_keys import (
    mmdit_config_from_diffusers,
    mmdit_from_diffusers,
    read_sd3_transformer,
    write_sd3_transformer,
)
from ldm.formats.weight_folder import (CLIP_SUBS, T5_SUB, T5_TIED, T5_TOKENIZER, TEXT_PREFIX, check_text_folders,
                                      read_weights)
from ldm.models.bundle import ModelBundle

SD3_PIPELINE = "StableDiffusion3Pipeline"
T5_LENGTH = 256  # diffusers' max_sequence_length default: the T5 tokens of SD3's context
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers with StableDiffusion3Pipeline + SD3.5's options (pyproject's floor)


# the diffusers pipelines whose folders are read by their own loaders (a transformer/ folder, not unet/): the source
# kind (``detect_source``) <- model_index.json's _class_name prefix / transformer/config.json's _class_name
TRANSFORMER_PIPELINES = {"sd3_diffusers": ("StableDiffusion3", "SD3Transformer2DModel"),
                         "flux_diffusers": ("Flux", "FluxTransformer2DModel")}


def transformer_pipeline(path) -> str | None:
    """``sd3_diffusers`` / ``flux_diffusers`` for a diffusers folder of SD3's or FLUX.1's pipeline, else None:
    told by ``model_index.json``'s _class_name (StableDiffusion3* / Flux*; another pipeline is neither), or without
    one (as ``unet/`` + ``vae/`` for SD) by ``transformer/`` + ``vae/``, FLUX.1 when transformer/config.json names
    FluxTransformer2DModel."""
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():  # it names the pipeline: no other is guessed from the folders
        name = read_json_file(index).get("_class_name")
        return next((kind for kind, (pipeline, _) in TRANSFORMER_PIPELINES.items()
                     if isinstance(name, str) and name.startswith(pipeline)), None)
    if not ((path / "transformer").is_dir() and (path / "vae").is_dir()):
        return None
    config = path / "transformer" / "config.json"
    name = read_json_file(config).get("_class_name") if config.is_file() else None
    return "flux_diffusers" if name == TRANSFORMER_PIPELINES["flux_diffusers"][1] else "sd3_diffusers"


def is_sd3_folder(path) -> bool:
    """A diffusers folder of SD3's pipeline (``transformer_pipeline``)."""
    return transformer_pipeline(path) == "sd3_diffusers"


def hub_folder(hub_id) -> tuple[Path, str]:
    """A hub id's files on this machine (fetched unless HF_HUB_OFFLINE) and their kind: sd3_diffusers,
    flux_diffusers or diffusers."""
    try:
        folder = resolve_folder(hub_id)
    except Exception as err:  # offline, unknown repo, ...: huggingface_hub's many error types
        raise FileNotFoundError(f"model not found: {hub_id} is no local folder and could not be fetched from the "
                                f"hub ({type(err).__name__}: {err})") from err
    return folder, transformer_pipeline(folder) or "diffusers"


# ---------------------------------------------------------------------------------------------- the scheduler

# diffusers' FlowMatchEulerDiscreteScheduler fields -> FlowMatching's (bounded by FLOW_SCHEDULE_SCHEMA)
_FLOW_FIELDS = {"num_train_timesteps": "num_train_timesteps", "shift": "shift", "use_dynamic_shifting": "dynamic_shift",
                "base_shift": "base_shift", "max_shift": "max_shift", "base_image_seq_len": "base_seq_len",
                "max_image_seq_len": "max_seq_len"}
# its options that change the sigmas in ways our flow_euler does not: refused unless at diffusers' defaults
_FLOW_DEFAULTS = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
                  "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False,
                  "time_shift_type": "exponential"}
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


def read_flow_scheduler(folder, *, what: str = "an SD3 folder", **fixed) -> FlowMatching:
    """``scheduler/scheduler_config.json`` (a FlowMatchEulerDiscreteScheduler) -> FlowMatching, bounded. fixed:
    FlowMatching fields the pipeline sets, not the scheduler (FluxPipeline's sigmas: spacing="flux")."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    cfg = read_json_file(path) if path.is_file() else {"_class_name": FLOW_SCHEDULER}
    if not isinstance(cfg, dict) or cfg.get("_class_name", FLOW_SCHEDULER) != FLOW_SCHEDULER:
        raise CheckpointError(f"{path}: _class_name: {what}'s scheduler must be a {FLOW_SCHEDULER}, got "
                              f"{cfg.get('_class_name') if isinstance(cfg, dict) else cfg!r}")
    for key, default in _FLOW_DEFAULTS.items():
        if cfg.get(key, default) != default:
            raise CheckpointError(f"{path}: {key} = {cfg[key]!r} is not supported by our flow_euler sampler "
                                  f"(only {default!r})")
    node = {"_target_": FLOW_SCHEDULE_TARGET, **{ours: cfg[k] for k, ours in _FLOW_FIELDS.items() if k in cfg},
            **fixed}
    return build_node(node, "schedule", source=str(path), key="scheduler")


def flow_scheduler_config(schedule: FlowMatching) -> dict:
    """FlowMatching -> the ``scheduler_config.json`` of diffusers' FlowMatchEulerDiscreteScheduler."""
    if not isinstance(schedule, FlowMatching):
        raise ExportError(f"an SD3 / FLUX.1 folder's scheduler is flow matching; this model's schedule is "
                          f"{type(schedule).__name__}")
    return {"_class_name": FLOW_SCHEDULER, "_diffusers_version": DIFFUSERS_VERSION,
            **{k: getattr(schedule, ours) for k, ours in _FLOW_FIELDS.items()}, **_FLOW_DEFAULTS}


# ---------------------------------------------------------------------------------------------- reading


def _config(sub: Path) -> dict:
    path = sub / "config.json"
    config = read_json_file(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    check_plain({k: v for k, v in config.items() if k not in DIFFUSERS_METADATA}, source=str(path), key="config")
    return config


def load_sd3_text_encoder(folder, *, joint_dim: int, use_t5: bool = True, t5_length: int = T5_LENGTH,
                          **options) -> nn.Module:
    """SD3TextEncoder of a folder's CLIP-L + CLIP-G (+ T5 when the folder has ``text_encoder_3/`` and use_t5)."""
    from ldm.models.text_encoder_sd3 import SD3TextEncoder

    folder = Path(folder)
    t5 = check_text_folders(folder, use_t5)
    return SD3TextEncoder.from_pretrained(folder, use_t5=t5, joint_dim=joint_dim, t5_length=t5_length, **options)


def load_sd3_diffusers(source, *, text_encoder=None, use_t5: bool = True, t5_length: int = T5_LENGTH) -> ModelBundle:
    """A whole SD3 folder -> ModelBundle (MMDiT, SD3's VAE, SD3TextEncoder, FlowMatching with the folder's shift).
    text_encoder: an SD3TextEncoder to use instead of the folder's, or another SD3 folder to take them from."""
    def text(unet):
        return text_encoder if isinstance(text_encoder, nn.Module) else load_sd3_text_encoder(
            source if text_encoder is None else text_encoder, joint_dim=unet.config["joint_attention_dim"],
            use_t5=use_t5, t5_length=t5_length)

    return load_pipeline_folder(source, "sd3_diffusers", read_sd3_transformer, text, read_flow_scheduler(source))


def load_pipeline_folder(source, kind: str, read_transformer, text_encoder, schedule,
                         sample_size: int | None = None) -> ModelBundle:
    """A diffusers folder of a transformer pipeline (SD3's, FLUX.1's) -> ModelBundle: ``read_transformer(folder /
    "transformer")`` (bounded), the VAE of ``vae/`` (bounded), ``text_encoder(transformer)`` and the schedule.
    sample_size: the pipeline's default latent size when the transformer's config has none (FluxPipeline: 128)."""
    folder = Path(source)
    for sub in ("transformer", "vae"):
        if not (folder / sub).is_dir():
            raise CheckpointError(f"{folder}: a {kind} folder needs {sub}/")
    unet = read_transformer(folder / "transformer")
    vae = load_diffusers_folder(folder, components=("vae",))["vae"]
    size = unet.config["sample_size"] if sample_size is None else sample_size
    meta = {"format": kind, "resolution": size * vae.downsample_factor,
            # diffusers decodes SD3's and FLUX.1's VAE in float32 (force_upcast, as SDXL's): so does ModelBundle.to
            "vae_fp32": _config(folder / "vae").get("force_upcast", True) is not False}
    return ModelBundle(unet, vae, text_encoder(unet), schedule, source=str(source), meta=meta)


def _same_config(ours: dict, stored: dict, what: str, path: Path) -> None:
    """The configured network (model.unet / model.autoencoder) is what the folder holds, or a clear error."""
    diff = {k: (ours.get(k), v) for k, v in stored.items()
            if k in ours and (list(ours[k]) if isinstance(ours[k], tuple) else ours[k])
            != (list(v) if isinstance(v, tuple) else v)}
    if diff:
        shown = ", ".join(f"model.{what}.{k}={a!r} but the folder's {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}: the configured {what} is not the folder's: {shown}")


def load_text_weights_into(text_encoder: nn.Module, clips: list[dict], t5: dict | None, *, source: str,
                           t5_required: bool = True, kind: type | None = None) -> None:
    """Text encoder weights from hub-keyed CLIP (``text_model.*`` (+ ``text_projection.weight``)) and T5 state
    dicts: SD3TextEncoder's CLIP-L / CLIP-G (``model``, ``model_2``), or FluxTextEncoder's CLIP-L (``model``) with
    kind=FluxTextEncoder. t5_required=False: an encoder's T5 keeps its weights when ``t5`` is None."""
    from ldm.models.text_encoder_sd3 import SD3TextEncoder

    kind = kind or SD3TextEncoder
    if not isinstance(text_encoder, kind):
        raise CheckpointError(f"{source}: these weights need the text encoder {kind.__name__}, got "
                              f"{type(text_encoder).__name__}")
    for attr, state, name in zip(("model", "model_2"), clips, ("clip_l", "clip_g")):
        model = getattr(text_encoder, attr)
        nested = any(k.startswith(TEXT_PREFIX) for k in model.state_dict())  # a CLIPTextModel's keys: not since 5.6
        load_into(model, {k if nested else k.removeprefix(TEXT_PREFIX): v for k, v in state.items()
                          if not k.endswith("position_ids")}, source=f"{source} ({name})")
    if text_encoder.t5 is not None and (t5 is not None or t5_required):
        if t5 is None:
            raise CheckpointError(f"{source}: the text encoder has a T5 but the weights hold none: build it without "
                                  "(use_t5=false) or give weights with a T5")
        state = dict(t5)
        for tied in T5_TIED if "shared.weight" in state else ():
            state.setdefault(tied, state["shared.weight"])
        load_into(text_encoder.t5, state, source=f"{source} (t5xxl)")


def built_from(text_encoder: nn.Module, folder: Path) -> bool:
    """The SD3 models' text encoders were just built from this folder's weights (model.text_encoder.path_or_hub_id =
    model.pretrained, the SD3 configs' default; transformers records the folder as each config's _name_or_path):
    reading them again would hold a second copy of T5-XXL (9.5 GB) for nothing."""
    models = [getattr(text_encoder, n, None) for n in ("model", "model_2", "t5")]
    paths = {str(getattr(getattr(m, "config", None), "_name_or_path", "")) for m in models if m is not None}
    return len(paths) == 1 and Path(paths.pop()).resolve() == Path(folder).resolve()


def load_sd3_folder_into(source, unet: nn.Module, autoencoder: nn.Module | None = None,
                         text_encoder: nn.Module | None = None) -> None:
    """Fill configured networks (fine-tuning: ``model.pretrained=<SD3 folder>``) strictly from an SD3 folder: the
    configured MMDiT / VAE must be the folder's (a clear error names the differing fields)."""
    folder = Path(source)
    if not hasattr(unet, "joint_blocks"):
        raise CheckpointError(f"{folder}: an SD3 folder's transformer loads into an MMDiT (model=sd35_medium, "
                              f"sd3_medium, sd35_large), not a {type(unet).__name__}")
    fill_transformer_and_vae(folder, unet, autoencoder, mmdit_config_from_diffusers, mmdit_from_diffusers)
    if text_encoder is not None and not built_from(text_encoder, folder):
        t5 = check_text_folders(folder, use_t5=getattr(text_encoder, "t5", None) is not None)
        clips = [read_weights(folder / sub, "model") for sub, _ in CLIP_SUBS]
        load_text_weights_into(text_encoder, clips, read_weights(folder / T5_SUB, "model") if t5 else None,
                               source=str(folder))


def fill_transformer_and_vae(folder: Path, unet: nn.Module, autoencoder: nn.Module | None, config_from,
                             from_diffusers) -> None:
    """A transformer pipeline folder's ``transformer/`` (its config mapped by ``config_from``, its weights by
    ``from_diffusers``) and ``vae/`` into configured networks, each config equal to the folder's or a clear error
    naming the ``model.unet.*`` / ``model.autoencoder.*`` key."""
    sub = folder / "transformer"
    _same_config(unet.config, _converted(config_from, sub), "unet", sub / "config.json")
    load_into(unet, from_diffusers(read_weights(sub, "diffusion_pytorch_model"), unet.config), source=str(sub))
    if autoencoder is not None:
        _same_config(autoencoder.config, _converted(vae_config_from_diffusers, folder / "vae"), "autoencoder",
                     folder / "vae" / "config.json")
        load_diffusers_folder(folder, vae=autoencoder, components=("vae",))


# ---------------------------------------------------------------------------------------------- writing


def sd3_model_index(tokenizers: dict[str, object], t5: bool) -> dict:
    """``model_index.json`` of a StableDiffusion3Pipeline (no T5: text_encoder_3 / tokenizer_3 null)."""
    none = [None, None]
    tok = {k: ["transformers", type(v).__name__] for k, v in tokenizers.items()}
    return {"_class_name": SD3_PIPELINE, "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", FLOW_SCHEDULER], "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": tok["tokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": tok["tokenizer_2"],
            "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else none,
            "tokenizer_3": tok[T5_TOKENIZER] if t5 else none,
            "image_encoder": none, "feature_extractor": none}


def clip_hub_state(model: nn.Module) -> dict:
    """A CLIPTextModelWithProjection's weights with the hub names (``text_model.*`` + ``text_projection.weight``)."""
    from ldm.models.text_encoder_sdxl import _hub_keys_2

    return _hub_keys_2(model.state_dict())


def t5_state(model: nn.Module) -> dict:
    """A T5EncoderModel's weights as transformers stores them (the tied embedding once, as ``shared.weight``)."""
    return {k: v for k, v in model.state_dict().items() if k not in T5_TIED}


def write_text_models(parts, folder: Path, dtype: torch.dtype | None = None) -> list[str]:
    """Each (subfolder, tokenizer subfolder, model, tokenizer, architecture, state): the model's config + weights
    (``state``, hub-keyed) in ``subfolder/`` and its tokenizer in ``tokenizer subfolder/``, as transformers saves
    them."""
    from ldm.formats.diffusers_folder import _write_text_model

    written = []
    for sub, tok, model, tokenizer, architecture, state in parts:
        _write_text_model(model.config, state, folder / sub, architecture, dtype)
        tokenizer.save_pretrained(str(folder / tok))
        written += [f"{sub}/", f"{tok}/"]
    return written


def write_sd3_text_encoder(text_encoder: nn.Module, folder: Path, dtype: torch.dtype | None = None) -> list[str]:
    """``text_encoder{,_2}/`` (CLIPTextModelWithProjection) + ``tokenizer{,_2}/``, and ``text_encoder_3/`` (T5) +
    ``tokenizer_3/`` when the encoder has a T5."""
    parts = [(sub, tok, model, tokenizer, "CLIPTextModelWithProjection", clip_hub_state(model))
             for (sub, tok), model, tokenizer in zip(CLIP_SUBS, (text_encoder.model, text_encoder.model_2),
                                                     (text_encoder.tokenizer, text_encoder.tokenizer_2))]
    if text_encoder.t5 is not None:
        parts.append((T5_SUB, T5_TOKENIZER, text_encoder.t5, text_encoder.t5_tokenizer, "T5EncoderModel",
                      t5_state(text_encoder.t5)))
    return write_text_models(parts, folder, dtype)


def check_sd3(bundle: ModelBundle) -> None:
    """What a StableDiffusion3Pipeline folder cannot represent, found before anything is written."""
    from ldm.models.text_encoder_sd3 import SD3TextEncoder

    if not hasattr(bundle.unet, "joint_blocks"):
        raise ExportError(f"an SD3 folder holds an MMDiT; this model's denoiser is {type(bundle.unet).__name__}")
    flow_scheduler_config(bundle.schedule)
    if not hasattr(bundle.autoencoder, "encoder"):
        raise ExportError("an SD3 folder holds a KL autoencoder (vae/); this model has none")
    if not isinstance(bundle.text_encoder, SD3TextEncoder):
        raise ExportError(f"an SD3 folder holds SD3's text encoders; this model's is "
                              f"{type(bundle.text_encoder).__name__}")


def write_sd3_diffusers(bundle: ModelBundle, folder, *, frozen: bool = True, dtype: torch.dtype | None = None,
                        resolution: int | None = None) -> list[str]:
    """A StableDiffusion3Pipeline folder that ``StableDiffusion3Pipeline.from_pretrained`` loads unchanged;
    ``frozen=False`` writes only ``transformer/``, ``scheduler/`` and ``model_index.json``."""
    check_sd3(bundle)
    te = bundle.text_encoder
    tokenizers = {"tokenizer": te.tokenizer, "tokenizer_2": te.tokenizer_2, T5_TOKENIZER: te.t5_tokenizer}
    return write_pipeline_folder(bundle, folder, write_sd3_transformer, write_sd3_text_encoder,
                                 sd3_model_index(tokenizers, frozen and te.t5 is not None), frozen=frozen,
                                 dtype=dtype, resolution=resolution)


def write_pipeline_folder(bundle: ModelBundle, folder, write_transformer, write_text_encoder, model_index: dict, *,
                          frozen: bool = True, dtype: torch.dtype | None = None,
                          resolution: int | None = None) -> list[str]:
    """A transformer pipeline's folder (SD3's, FLUX.1's): ``write_transformer(unet, folder / "transformer", dtype)``,
    with ``frozen`` the VAE (``vae/``, no quant convs, its shift and scale) and ``write_text_encoder(text_encoder,
    folder, dtype)``, the FlowMatchEulerDiscreteScheduler of the schedule and ``model_index``."""
    folder = Path(folder)
    write_transformer(bundle.unet, folder / "transformer", dtype)
    written = ["transformer/"]
    if frozen:
        vae = bundle.autoencoder
        vae_config = {**vae_diffusers_config(vae.config, resolution),
                      "force_upcast": bool(bundle.meta.get("vae_fp32", True))}
        write_json(folder / "vae" / "config.json", vae_config)
        save_safetensors(cast_state(vae_ldm_to_diffusers(vae.state_dict(), vae.config), dtype),
                         folder / "vae" / "diffusion_pytorch_model.safetensors")
        written += ["vae/"] + write_text_encoder(bundle.text_encoder, folder, dtype)
    write_json(folder / "scheduler" / "scheduler_config.json", flow_scheduler_config(bundle.schedule))
    write_json(folder / "model_index.json", model_index)
    return written + ["scheduler/", "model_index.json"]
