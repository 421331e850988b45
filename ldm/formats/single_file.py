"""Original Stable Diffusion single-file checkpoints (``.ckpt`` / ``.safetensors``), reader and writer: the state
dict layout, building a bundle from one (sizes from the key shapes or from our header), and writing one with its
``v1/v2-inference.yaml``-style config (SDXL: SGM's ``sd_xl_base.yaml``-style one, ``sgm_config.py``).

Layout: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.text_model.*`` (SD1, transformers CLIP) or
``cond_stage_model.model.*`` (SD2, OpenCLIP). Our UNet / VAE use the original
names, so they only need the prefix stripped.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.formats.common import (
    ExportError,
    _no_checkpointing,
    check_sd_layout,
    cast_state,
    check_schedule,
    save_safetensors,
    schedule_kwargs,
    strip_prefix,
    text_model,
)
from ldm.formats.openclip_keys import DROPPED, hf_to_openclip, openclip_num_layers, openclip_to_hf
from ldm.formats.safe_build import SCHEDULE_TARGET, build_network, build_node, json_object
from ldm.formats.safe_load import CheckpointError, copy_checked, load_state_dict, mismatch_report
from ldm.formats.sgm_config import first_stage_params, sgm_config, unet_size_params
from ldm.formats.shared_names import shared_name
from ldm.formats.sdxl_single_file import (
    SDXL_TEXT_2_PREFIX,
    SDXL_TEXT_PREFIX,
    is_sdxl_file,
    sdxl_text_to_single_file,
    split_sdxl_text,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."


def _ema_key(unet_key: str) -> str:
    """Original EMA name: ``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab``."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def split_sd_checkpoint(sd: dict, use_ema: bool = False) -> dict:
    """Split an SD1/SD2 single-file state dict into components.

    Returns ``{"unet", "vae", "text_encoder", "kind", "text_layers", "extra"}``:
    UNet / VAE keys in our layout, text encoder in transformers hub keys
    (``text_model.*``, all OpenCLIP blocks kept), ``kind`` "sd1" or "sd2",
    the file's text-encoder depth, and leftover keys (schedule buffers, EMA...).
    """
    unet_keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    if not unet_keys:
        raise CheckpointError("not a Stable Diffusion checkpoint: no 'model.diffusion_model.*' keys")
    if use_ema:
        missing = [k for k in unet_keys if _ema_key(k) not in sd]
        if missing:
            raise CheckpointError(f"use_ema=True but {len(missing)} UNet weights have no EMA copy, e.g. {missing[0]}")
        unet = {k[len(UNET_PREFIX):]: sd[_ema_key(k)] for k in unet_keys}
    else:
        unet = strip_prefix(sd, UNET_PREFIX)
    vae = {k: v for k, v in strip_prefix(sd, VAE_PREFIX).items() if not k.startswith("loss.")}

    sd2_text = strip_prefix(sd, SD2_TEXT_PREFIX)
    sd1_text = strip_prefix(sd, SD1_TEXT_PREFIX)
    text_2: dict = {}
    if is_sdxl_file(sd):  # SGM: conditioner.embedders.0 (ViT-L) + 1 (OpenCLIP bigG)
        kind = "sdxl"
        text, text_2 = split_sdxl_text(sd)
        text_layers = len({m.group(1) for k in text if (m := re.search(r"encoder\.layers\.(\d+)\.", k))})
    elif sd2_text:
        kind, text_layers = "sd2", openclip_num_layers(sd2_text)
        text = openclip_to_hf(sd2_text)
    else:
        text = {
            (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd1_text.items()
            if not k.endswith("position_ids")
        }
        text_layers = len({m.group(1) for k in text if (m := re.search(r"encoder\.layers\.(\d+)\.", k))})
        kind = "sd1" if sd1_text else _kind_from_unet(unet)

    used = {UNET_PREFIX, VAE_PREFIX, SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_TEXT_PREFIX, SDXL_TEXT_2_PREFIX}
    extra = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in used)}
    extra.update({VAE_PREFIX + k: v for k, v in strip_prefix(sd, VAE_PREFIX).items() if k.startswith("loss.")})
    extra.update({SD2_TEXT_PREFIX + k: v for k, v in sd2_text.items() if k in DROPPED or k.startswith("visual.")})
    extra.update({SDXL_TEXT_2_PREFIX + k: v for k, v in strip_prefix(sd, SDXL_TEXT_2_PREFIX).items()
                  if k.startswith("visual.") or k == "logit_scale"})
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2, "kind": kind,
            "text_layers": text_layers, "extra": extra}


def _kind_from_unet(unet: dict) -> str:
    """SD2 UNets use linear transformer projections and a 1024-wide context."""
    for key, value in unet.items():
        if key.endswith("attn2.to_k.weight"):
            return "sd2" if value.shape[1] == 1024 else "sd1"
        if key.endswith("proj_in.weight"):
            return "sd2" if value.ndim == 2 else "sd1"
    return "sd1"


def _text_state_for(text_encoder, parts: dict) -> dict:
    """Text-encoder weights of ``parts`` keyed like ``text_encoder``'s model."""
    from ldm.models.text_encoder import to_module_keys

    model = text_model(text_encoder)
    text = parts["text_encoder"]
    depth = model.config.num_hidden_layers
    if parts["kind"] == "sd2" and parts["text_layers"] == depth + 1:
        # The SD2 text encoder uses the penultimate block output: the last block is unused.
        drop = f"text_model.encoder.layers.{depth}."
        text = {k: v for k, v in text.items() if not k.startswith(drop)}
    return to_module_keys(text, model)


def load_single_file(path, unet, vae=None, text_encoder=None, strict: bool = True,
                     use_ema: bool = False, source: str | None = None) -> dict:
    """Load an SD single file (path or state dict) into our modules.

    Every component is checked before anything is copied; problems in any of
    them are reported together in one ``CheckpointError``. Returns
    ``{"kind", "extra"}`` (extra = names of keys that were not used).
    source: the file a given state dict was read from (for messages).
    """
    source = source or ("<state dict>" if isinstance(path, dict) else str(path))
    sd = path if isinstance(path, dict) else load_state_dict(path)
    parts = split_sd_checkpoint(sd, use_ema=use_ema)
    jobs = [(unet, parts["unet"], "unet")]
    if vae is not None:
        jobs.append((vae, parts["vae"], "vae"))
    if text_encoder is not None:
        jobs.append((text_model(text_encoder), _text_state_for(text_encoder, parts), "text_encoder"))
        if hasattr(text_encoder, "model_2") or parts["kind"] == "sdxl":
            if not hasattr(text_encoder, "model_2") or parts["kind"] != "sdxl":
                raise CheckpointError(f"cannot load {source}: an SDXL file needs the dual SDXL text encoder "
                                      f"(DualCLIPTextEncoder) and it needs an SDXL file; got a {parts['kind']} file "
                                      f"and a {type(text_encoder).__name__}")
            jobs.append((text_encoder.model_2, parts["text_encoder_2"], "text_encoder_2"))
    reports = [mismatch_report(m, s, strict=strict, name=n) for m, s, n in jobs]
    reports = [r for r in reports if r]
    if reports:
        raise CheckpointError(f"cannot load {source}\n" + "\n".join(reports))
    for module, state, name in jobs:  # a module built on the meta device gets its memory here, once checked
        copy_checked(module, state, source=f"{source} ({name})")
    return {"kind": parts["kind"], "extra": sorted(parts["extra"])}


def text_encoder_layout(text_encoder) -> str:
    """"sd2" (OpenCLIP layout) for gelu CLIP text models, else "sd1"."""
    return "sd2" if text_model(text_encoder).config.hidden_act == "gelu" else "sd1"


def to_single_file(unet, vae=None, text_encoder=None, layout: str | None = None) -> dict:
    """Our modules -> an original-layout state dict (save with safetensors).

    The text encoder is written as SD1 ``cond_stage_model.transformer.text_model.*``
    or SD2 OpenCLIP ``cond_stage_model.model.*`` (``layout`` "sd1"/"sd2", default
    from its activation: gelu = OpenCLIP). SD2 files get only the blocks the
    model has (no unused 24th block, no ``text_projection``).
    """
    from ldm.models.text_encoder import to_hub_keys

    out = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    if vae is not None:
        out.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    if text_encoder is not None and hasattr(text_encoder, "hub_state_dicts"):  # SDXL: conditioner.embedders.*
        out.update(sdxl_text_to_single_file(*text_encoder.hub_state_dicts()))
    elif text_encoder is not None:
        hub = to_hub_keys(text_model(text_encoder).state_dict())
        if (layout or text_encoder_layout(text_encoder)) == "sd2":
            out.update({SD2_TEXT_PREFIX + k: v for k, v in hf_to_openclip(hub).items()})
        else:
            out.update({SD1_TEXT_PREFIX + k: v for k, v in hub.items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


# Header keys of single files written by save_single_file: they make sizes, heads and schedule exact.
META_UNET, META_VAE = "ldm_unet_config", "ldm_vae_config"
META_SCHEDULE, META_RESOLUTION = "ldm_schedule", "ldm_resolution"
# Tokenizers for SD single files, which carry none.
DEFAULT_TOKENIZERS = {"sd1": ("openai/clip-vit-large-patch14", ""),
                      "sd2": ("stabilityai/stable-diffusion-2-1", "tokenizer"),
                      "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer")}
SDXL_SCALING_FACTOR = 0.13025  # sd_xl_base.yaml scale_factor


def sd_schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
    """Stable Diffusion's training schedule: scaled_linear, beta 0.00085..0.012, T = 1000."""
    return NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012, prediction_type=prediction_type)


def load_sd_single_file(path, *, use_ema: bool = True, text_encoder: nn.Module | None = None,
                        prediction_type: str | None = None, unet_config: dict | None = None,
                        vae_config: dict | None = None) -> ModelBundle:

    path = Path(path)
    state = load_state_dict(path)
    header = _safetensors_metadata(path)
    sched = _json(header, META_SCHEDULE, path)
    schedule = (build_node({"_target_": SCHEDULE_TARGET, **sched}, "schedule", source=str(path), key=META_SCHEDULE)
                if sched else sd_schedule())
    ema = use_ema and any(k.startswith("model_ema.") for k in state)
    parts = split_sd_checkpoint(state, use_ema=ema)
    if not parts["vae"]:
        raise CheckpointError(f"{path}: no VAE weights ('first_stage_model.*'); this loader needs a full SD file")
    ucfg = {**(_json(header, META_UNET, path) or _inferred(infer_unet_config, parts["unet"], path, "U-Net")),
            **(unet_config or {})}
    inferred_vae = _inferred(infer_vae_config, parts["vae"], path, "VAE") if META_VAE not in header else None
    if inferred_vae is not None and parts["kind"] == "sdxl":
        inferred_vae["scaling_factor"] = SDXL_SCALING_FACTOR
    vcfg = {**(_json(header, META_VAE, path) or inferred_vae), **(vae_config or {})}
    unet = _build("unet", ucfg, path, META_UNET if META_UNET in header else "inferred U-Net config", "unet_config")
    vae = _build("autoencoder", vcfg, path, META_VAE if META_VAE in header else "inferred VAE config", "vae_config")
    has_text = bool(parts["text_encoder"])
    te = text_encoder if text_encoder is not None else _default_text_encoder(path, parts)
    load_single_file(state, unet, vae, te if has_text else None, use_ema=ema, source=str(path))
    if prediction_type is not None:
        schedule = replace(schedule, prediction_type=prediction_type)
    meta = {"format": "sd_single_file", "kind": parts["kind"], "ema": ema}
    if parts["kind"] == "sdxl":
        meta["vae_fp32"] = True  # SDXL's VAE overflows in float16
    if header.get(META_RESOLUTION):
        meta["resolution"] = _resolution(header[META_RESOLUTION], path)
    return ModelBundle(unet, vae, te, schedule, source=str(path), meta=meta)


def _resolution(text: str, path: Path) -> int:
    if not (text.isdigit() and len(text) <= 6 and 0 < int(text) <= 65536):
        raise CheckpointError(f"{path} (header): {META_RESOLUTION} = {text[:40]!r} must be a resolution in pixels")
    return int(text)


def _inferred(infer, state: dict, path: Path, what: str) -> dict:
    """A config inferred from the file's keys and shapes, or a CheckpointError naming the file."""
    try:
        return infer(state)
    except (KeyError, IndexError, StopIteration, ZeroDivisionError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot infer the {what} config from its weights ({type(err).__name__}: "
                              f"{err}); not an SD layout we know") from err


def _build(role: str, config: dict, path: Path, key: str, option: str):
    """Through the one safe builder, on the meta device: a header cannot make us import anything, and the sizes
    it (or the keys) state get memory only once load_single_file has checked the file's tensors against them."""
    try:
        return build_network(role, config, source=str(path), key=key, meta=True)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; fix it with {option}={{...}}") from err


def _safetensors_metadata(path: Path) -> dict:
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _json(header: dict, key: str, path: Path) -> dict | None:
    return json_object(header[key], source=f"{path} (header)", key=key) if header.get(key) else None


def _default_sdxl_text_encoder(path: Path, parts: dict) -> nn.Module:
    """SDXL: ViT-L + bigG of SDXL base's configs, the two tokenizers of its hub repo."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder, sdxl_text_configs

    repo = DEFAULT_TOKENIZERS["sdxl"][0]
    hint = "pass text_encoder=<a diffusers SDXL folder (tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/)>"
    if not parts["text_encoder"] or not parts["text_encoder_2"]:
        raise CheckpointError(f"{path}: the SDXL file lacks conditioner.embedders.0/1 text weights; {hint}")
    vit_l, big_g = sdxl_text_configs()
    widths = [next(v.shape[1] for k, v in p.items() if k.endswith("token_embedding.weight"))
              for p in (parts["text_encoder"], parts["text_encoder_2"])]
    if widths != [vit_l.hidden_size, big_g.hidden_size]:
        raise CheckpointError(f"{path}: text encoders of widths {widths} are not SDXL's "
                              f"({[vit_l.hidden_size, big_g.hidden_size]}); {hint}")
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(repo, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{path}: SDXL single files carry no tokenizers and the default ones ({repo}) are "
                                f"not available ({type(err).__name__}); {hint}") from err
    return DualCLIPTextEncoder(CLIPTextModel(vit_l), tokenizers[0], CLIPTextModelWithProjection(big_g), tokenizers[1])


def _default_text_encoder(path: Path, parts: dict) -> nn.Module:
    """SD1: CLIP ViT-L/14 config; SD2: OpenCLIP ViT-H (23 layers); the tokenizer of the matching hub repo."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.models.text_encoder import CLIPTextEncoder, clip_text_config

    kind = parts["kind"]
    if kind == "sdxl":
        return _default_sdxl_text_encoder(path, parts)
    repo, sub = DEFAULT_TOKENIZERS[kind]
    hint = "pass text_encoder=<folder with tokenizer/ and text_encoder/, e.g. a diffusers SD folder>"
    if not parts["text_encoder"]:
        raise CheckpointError(f"{path}: no text-encoder weights in the file; {hint}")
    hidden = next((v.shape[1] for k, v in parts["text_encoder"].items()
                   if k.endswith("token_embedding.weight") and v.ndim == 2), None)
    config = clip_text_config("sd15" if kind == "sd1" else "sd21")
    if hidden != config.hidden_size:
        raise CheckpointError(f"{path}: text encoder of width {hidden} is not SD's ({config.hidden_size}); {hint}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder=sub)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{path}: SD single files carry no tokenizer and the default one ({repo}) is "
                                f"not available ({type(err).__name__}); {hint}") from err
    return CLIPTextEncoder(CLIPTextModel(config), tokenizer)


_INPUT_BLOCK = re.compile(r"input_blocks\.(\d{1,4})\.")
MAX_INPUT_BLOCKS = 32 * 17  # channel_mult levels x (num_res_blocks + a downsample), the bounds of UNET_SCHEMA


def _count(state: dict, pattern: str) -> int:
    """How many distinct values the (\\d+) group of ``pattern`` takes among the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_unet_config(state: dict) -> dict:
    """UNet constructor arguments from original-layout U-Net weights (prefix stripped).

    Heads cannot be read from weights: SD1's rule (8 heads) is used for conv projections, SD2's (64-wide heads)
    for linear ones; other models need ``unet_config={"num_heads": ...}`` or a file from save_single_file.
    """
    conv_in = state["input_blocks.0.0.weight"]  # (model_channels, in_channels, 3, 3)
    mc = conv_in.shape[0]
    level, per_level, mult, attn, depth = 0, {}, {}, set(), {}
    blocks = {int(m.group(1)) for k in state if (m := _INPUT_BLOCK.match(k))}  # one pass over the keys
    if len(blocks) > MAX_INPUT_BLOCKS:
        raise ValueError(f"{len(blocks)} input blocks (a U-Net of our schema has at most {MAX_INPUT_BLOCKS})")
    i = 1
    while i in blocks:
        if f"input_blocks.{i}.0.op.weight" in state:  # Downsample
            level += 1
        else:
            per_level[level] = per_level.get(level, 0) + 1
            mult[level] = state[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0] // mc
            if f"input_blocks.{i}.1.proj_in.weight" in state:
                attn.add(level)
                depth[level] = _count(state, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
        i += 1
    linear = state["middle_block.1.proj_in.weight"].ndim == 2
    context_dim = next(v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight"))
    heads = dict(num_heads=-1, num_head_channels=64) if linear else dict(num_heads=8, num_head_channels=-1)
    middle = _count(state, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    levels = range(level + 1)
    per_level_depth = [depth.get(lvl, 0) for lvl in levels]
    uniform = set(depth.values()) <= {middle}
    extra = {} if "label_emb.0.0.weight" not in state else {"adm_in_channels": state["label_emb.0.0.weight"].shape[1]}
    return dict(
        in_channels=conv_in.shape[1], out_channels=state["out.2.weight"].shape[0], model_channels=mc,
        channel_mult=[mult[lvl] for lvl in range(level + 1)], num_res_blocks=per_level[0],
        attention_levels=sorted(attn), transformer_depth=middle if uniform else per_level_depth,
        context_dim=context_dim, use_linear_projection=linear, **heads, **extra,
    )


def infer_vae_config(state: dict) -> dict:
    """AutoencoderKL constructor arguments from original-layout VAE weights (scaling factor: SD's 0.18215)."""
    conv_in = state["encoder.conv_in.weight"]  # (base_channels, in_channels, 3, 3)
    base = conv_in.shape[0]
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    return dict(
        in_channels=conv_in.shape[1], out_channels=state["decoder.conv_out.weight"].shape[0],
        latent_channels=state["decoder.conv_in.weight"].shape[1], base_channels=base,
        channel_mult=[state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base for i in range(levels)],
        num_res_blocks=_count(state, r"encoder\.down\.0\.block\.(\d+)\."),
    )


def save_single_file(path, bundle: ModelBundle, resolution: int | None = None) -> Path:
    """Write an SD-layout ``.safetensors`` whose header also records the U-Net / VAE configs, the schedule and
    the training resolution, so :func:`load_bundle` rebuilds the model exactly (other tools ignore the header).
    The header is the single-file export's (:func:`write_single_file`), without its yaml and its checks."""
    header = single_file_header(bundle, resolution or 0, None)
    if not resolution:
        header.pop(META_RESOLUTION)
    _save_sd_state(bundle, Path(path), header)
    return Path(path)


def _save_sd_state(bundle: ModelBundle, path: Path, header: dict[str, str], *, frozen: bool = True,
                   dtype: torch.dtype | None = None, layout: str | None = None) -> None:
    te = bundle.text_encoder
    state = to_single_file(bundle.unet, bundle.autoencoder if frozen else None, te if frozen else None, layout=layout)
    save_safetensors(cast_state(state, dtype), path, header)

ORIGINAL_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}
ORIGINAL_PARAMETERIZATION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SD_NORM_GROUPS = 32  # the original VAE's GroupNorm groups: fixed in its code, absent from its yaml
SD1_EMBEDDER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
SD2_EMBEDDER = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"


def _original_heads(c: dict) -> dict:
    """Head settings of an original ``UNetModel``, written so that diffusers' yaml reader derives the same heads.

    diffusers reads ``num_heads`` as its (per-level) head count when present; otherwise (linear projections only)
    it derives ``model_channels // num_head_channels * mult``. SD1 gets ``num_heads: 8``, SD2 ``num_head_channels:
    64`` alone, exactly as in the official configs.
    """
    nhc = c.get("num_head_channels") or -1
    if nhc <= 0:
        return {"num_heads": c["num_heads"]}
    out: dict[str, Any] = {"num_head_channels": nhc}
    heads = [c["model_channels"] * m // nhc for m in c["channel_mult"]]
    levels = list(c["attention_levels"])
    if c.get("use_linear_projection"):
        derived = [c["model_channels"] // nhc * m for m in c["channel_mult"]]
        if all(derived[lvl] == heads[lvl] for lvl in levels):
            return out
    used = {heads[lvl] for lvl in levels}
    out["num_heads"] = used.pop() if len(used) == 1 else heads
    return out


def original_config(unet_config: dict, vae_config: dict, schedule: NoiseSchedule, *, text_layout: str = "sd1",
                    resolution: int = 512, text_layer: str = "penultimate") -> dict:
    """The original ``configs/stable-diffusion/v1-inference.yaml`` / ``v2-inference(-v).yaml`` structure for a model.

    ``text_layout`` "sd1" (transformers CLIP, ``FrozenCLIPEmbedder``) or "sd2" (OpenCLIP, ``FrozenOpenCLIPEmbedder``
    with ``text_layer``). A1111 instantiates these classes from the yaml, diffusers' ``from_single_file`` and
    ComfyUI read the sizes, the betas and the parameterization from it.
    """
    check_schedule(schedule)
    if vae_config.get("shift_factor"):
        raise ExportError(f"the autoencoder has shift_factor={vae_config['shift_factor']}, which the original "
                          "LatentDiffusion config cannot express; use --format diffusers or ldm")
    c = unet_config
    factor = 2 ** (len(vae_config["channel_mult"]) - 1)
    latent_size = resolution // factor
    latent_channels = vae_config.get("latent_channels", 4)
    unet_params: dict[str, Any] = {
        "use_checkpoint": True,
        "use_fp16": False,
        "image_size": latent_size,
        **unet_size_params(c),
        **_original_heads(c),
        "use_spatial_transformer": True,
        "transformer_depth": c.get("transformer_depth", 1),
        "context_dim": c["context_dim"],
        "legacy": False,
    }
    if c.get("use_linear_projection"):
        unet_params["use_linear_in_transformer"] = True
    vae_params = first_stage_params(vae_config, resolution)
    if text_layout == "sd2":
        cond = {"target": SD2_EMBEDDER, "params": {"freeze": True, "layer": text_layer}}
    else:
        cond = {"target": SD1_EMBEDDER}
    params: dict[str, Any] = {}
    if schedule.prediction_type != "epsilon":
        params["parameterization"] = ORIGINAL_PARAMETERIZATION[schedule.prediction_type]
    if schedule.kind != "scaled_linear":
        params["beta_schedule"] = ORIGINAL_BETA_SCHEDULES[schedule.kind]
    if schedule.beta_start is not None:
        params["linear_start"] = float(schedule.beta_start)
    if schedule.beta_end is not None:
        params["linear_end"] = float(schedule.beta_end)
    params.update({
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": schedule.num_train_timesteps,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": latent_size,
        "channels": latent_channels,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": float(vae_config.get("scaling_factor", 0.18215)),
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae_params},
        "cond_stage_config": cond,
    })
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def _sdxl_config(bundle: ModelBundle, resolution: int) -> dict:
    """SGM's ``sd_xl_base.yaml`` for an SDXL bundle (:func:`ldm.formats.sgm_config.sgm_config`)."""
    unet_config = _no_checkpointing(bundle.unet.config)
    te = bundle.text_encoder
    return sgm_config(unet_config, bundle.autoencoder.config, bundle.schedule, heads=_original_heads(unet_config),
                      vit_l_layers=te.model.config.num_hidden_layers, pooled_dim=te.pooled_dim,
                      resolution=resolution)


def original_config_yaml(config: dict, schedule: NoiseSchedule, source: str = "", sgm: bool = False) -> str:
    import yaml

    origin = ("SGM (Stability-AI/generative-models, sd_xl_base.yaml)" if sgm
              else "Original Stable Diffusion (CompVis ldm)")
    lines = [f"# {origin} config of the weights next to this file.",
             "# Written by ldm export" + (f" from {source}" if source else "") + "."]
    if schedule.zero_terminal_snr:
        lines += ["# The betas were rescaled to zero terminal SNR (Lin et al. 2023), which the original code has no",
                  "# option for: samplers must apply the rescale themselves (diffusers: rescale_betas_zero_snr=True,",
                  "# ComfyUI: ModelSamplingDiscrete zsnr)."]
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def text_layer_for(text_encoder) -> str:
    """OpenCLIP layer of an SD2-layout text encoder: SD2 conditions on the penultimate of 24 blocks, which is what a
    penultimate encoder, or diffusers' 23-block one, computes."""
    model = text_model(text_encoder)
    if getattr(text_encoder, "penultimate", False) or model.config.num_hidden_layers == 23:
        return "penultimate"
    return "last"


def check_single_file(bundle: ModelBundle) -> None:
    """What an SD single file + yaml cannot represent, found before anything is written."""
    check_sd_layout(bundle, "an SD single file")
    sdxl = hasattr(bundle.text_encoder, "model_2")
    if sdxl or bundle.unet.config.get("adm_in_channels"):
        if not (sdxl and bundle.unet.config.get("adm_in_channels")):
            raise ExportError("an SDXL single file needs both the SDXL U-Net (adm_in_channels) and the dual SDXL text "
                              f"encoder; got a {type(bundle.text_encoder).__name__} and adm_in_channels="
                              f"{bundle.unet.config.get('adm_in_channels')}: use --format ldm")
        _sdxl_config(bundle, 1024)  # the sd_xl_base.yaml refusals (schedule, vector input), before anything is written
    if bundle.autoencoder.config.get("shift_factor"):
        raise ExportError(f"the autoencoder has shift_factor={bundle.autoencoder.config['shift_factor']}, which "
                          "SD single files cannot express; use --format diffusers or ldm")
    groups = bundle.autoencoder.config.get("norm_groups", SD_NORM_GROUPS)
    if groups != SD_NORM_GROUPS:
        # the original yaml has no GroupNorm field: every reader (diffusers' from_single_file, ComfyUI, A1111)
        # builds GroupNorm(32) and silently decodes the wrong image
        raise ExportError(f"the autoencoder uses GroupNorm with {groups} groups; an SD single file and its yaml "
                          f"can only describe {SD_NORM_GROUPS}: use --format diffusers (its vae/config.json records "
                          "norm_num_groups) or --format ldm")


def _text_config(model) -> dict:
    """A text model's config for the header, without ``_name_or_path``: the folder it was loaded from (a path of
    this machine, which transformers 4.x keeps) has no place in a shared file."""
    return {k: v for k, v in model.config.to_diff_dict().items() if k != "_name_or_path"}


def single_file_header(bundle: ModelBundle, resolution: int, dtype: torch.dtype | None) -> dict[str, str]:
    """safetensors header entries that let ``ldm.formats.load.load_bundle`` rebuild the model exactly (the U-Net / VAE
    configs, schedule, resolution); other tools ignore them."""

    te = bundle.text_encoder
    text = {"penultimate": bool(getattr(te, "penultimate", False)), "config": _text_config(text_model(te))}
    if hasattr(te, "model_2"):  # SDXL: the bigG config too
        text["config_2"] = _text_config(te.model_2)
    return {
        META_UNET: json.dumps(_no_checkpointing(bundle.unet.config), sort_keys=True),
        META_VAE: json.dumps(_no_checkpointing(bundle.autoencoder.config), sort_keys=True),
        META_SCHEDULE: json.dumps(schedule_kwargs(bundle.schedule), sort_keys=True),
        META_RESOLUTION: str(int(resolution)),
        "ldm_text_encoder": json.dumps(text, sort_keys=True, default=str),
        "ldm_dtype": str(dtype or next(bundle.unet.parameters()).dtype).removeprefix("torch."),
    }


def write_single_file(bundle: ModelBundle, path: Path, yaml_path: Path, *, frozen: bool = True,
                      dtype: torch.dtype | None = None, resolution: int = 512) -> list[str]:
    """An SD-layout ``.safetensors`` (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``,
    or SDXL's ``conditioner.embedders.{0,1}.*``; U-Net only when ``frozen=False``) and its original config at
    ``yaml_path`` (``v1/v2-inference.yaml``, or SGM's ``sd_xl_base.yaml`` for SDXL)."""
    check_single_file(bundle)
    te = bundle.text_encoder
    sdxl = hasattr(te, "model_2")
    layout = None if sdxl else text_encoder_layout(te)
    _save_sd_state(bundle, Path(path), single_file_header(bundle, resolution, dtype), frozen=frozen, dtype=dtype,
                   layout=layout)
    if sdxl:
        config = _sdxl_config(bundle, resolution)
    else:
        config = original_config(_no_checkpointing(bundle.unet.config), bundle.autoencoder.config, bundle.schedule,
                                 text_layout=layout, resolution=resolution, text_layer=text_layer_for(te))
    text = original_config_yaml(config, bundle.schedule, shared_name(bundle.source), sgm=sdxl)  # a shared file
    Path(yaml_path).write_text(text, encoding="utf-8")
    return [Path(path).name, Path(yaml_path).name]
