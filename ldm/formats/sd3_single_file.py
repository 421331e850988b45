"""The SD3 / SD3.5 transformer as a single file (Stability's release layout, what ComfyUI loads): our MMDiT's own
names under ``model.diffusion_model.`` (ComfyUI ``comfy/ldm/modules/diffusionmodules/mmdit.py``; diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` reads the same keys), read and written, and the MMDiT config
read back from the tensors' shapes (as diffusers' single-file loader infers it); and the whole model in one file
(the VAE under ``first_stage_model.``, the text encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``,
see below), read into a ModelBundle or into configured networks, and written with our exact configs in its header."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from safetensors import safe_open
from torch import Tensor, nn

from ldm.formats.common import _no_checkpointing, cast_state, save_safetensors
from ldm.formats.safe_build import FLOW_SCHEDULE_TARGET, build_network, build_node, check_kwargs, schema_of
from ldm.formats.safe_load import (CheckpointError, copy_checked, json_object, load_state_dict,
                                   mismatch_report)
from ldm.formats.sd3_folder import (check_sd3, clip_hub_state, load_sd3_text_encoder, load_text_weights_into,
                                    t5_state)
from ldm.formats.single_file import infer_vae_config
from ldm.formats.weight_folder import T5_TIED, cached_hub_folder
from ldm.models.bundle import ModelBundle
from ldm.models.text_encoder_sd3 import SD3TextOptions

PREFIX = "model.diffusion_model."


def mmdit_to_single_file(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our MMDiT state dict -> the single-file keys."""
    return {PREFIX + k: v for k, v in state_dict.items()}


def mmdit_from_single_file(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The single file's transformer tensors (other components, e.g. ``text_encoders.*``, left out) -> ours."""
    out = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    if "x_embedder.proj.weight" not in out:
        raise CheckpointError(f"no SD3 transformer in this file (no {PREFIX}x_embedder.proj.weight)")
    return out


def mmdit_config_from_tensors(state: dict[str, Tensor], attention_head_dim: int = 64,
                              sample_size: int = 128) -> dict:
    """An MMDiT config from our state dict's shapes. The head width is not in the tensors: SD3's is 64 (its width
    is 64 x depth); sample_size (the positions' base grid) neither: SD3's 128."""
    proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
    dim, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if dim % attention_head_dim:
        raise CheckpointError(f"SD3 transformer width {dim} is not a multiple of the head width {attention_head_dim}")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise CheckpointError("SD3 transformer: joint_blocks missing or not numbered 0..N-1")
    rows = state["pos_embed"].shape[1]
    side = math.isqrt(rows)
    if side * side != rows:
        raise CheckpointError(f"SD3 transformer: pos_embed has {rows} rows, not a square grid")
    final = state["final_layer.linear.weight"].shape[0]
    return dict(sample_size=sample_size, patch_size=patch, in_channels=in_channels, num_layers=len(blocks),
                attention_head_dim=attention_head_dim, num_attention_heads=dim // attention_head_dim,
                joint_attention_dim=state["context_embedder.weight"].shape[1],
                pooled_projection_dim=state["y_embedder.mlp.0.weight"].shape[1], out_channels=final // (patch * patch),
                pos_embed_max_size=side,
                dual_attention_layers=tuple(sorted(i for i in blocks
                                                   if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state)),
                qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in state else None)


# ---------------------------------------------------------------------------------------------- the whole model
# The layout of Stability's SD3 / SD3.5 release files (``sd3_medium_incl_clips_t5xxlfp16.safetensors``) that ComfyUI
# loads as one checkpoint (comfy/supported_models.py ``SD3``: text_encoder_key_prefix ["text_encoders."], the CLIPs
# detected by ``clip_l.transformer.text_model.final_layer_norm.weight`` / ``clip_g...``, the T5 by
# ``t5xxl.transformer.``; comfy/sd.py: the VAE under ``first_stage_model.`` with the original names, without
# quant convs): the text encoders in transformers' names under their prefixes.
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
# our header entries (other tools ignore them): the exact configs, so that a file of ours reads back as written
META_MMDIT, META_VAE, META_SCHEDULE = "ldm_mmdit_config", "ldm_vae_config", "ldm_schedule"
META_TEXT, META_RESOLUTION = "ldm_sd3_text", "ldm_resolution"
# what a Stability / ComfyUI SD3 file implies (no header): SD3's VAE latent format, shift 3.0 (ComfyUI's SD3
# sampling_settings and latent_formats.SD3)
SD3_VAE_LATENT = dict(scaling_factor=1.5305, shift_factor=0.0609)
SD3_SHIFT = 3.0
DEFAULT_SD3_REPO = "stabilityai/stable-diffusion-3.5-medium"  # tokenizers for a file that carries none


def is_sd3_file(keys) -> bool:
    return any(k.startswith(PREFIX + "joint_blocks.") for k in keys)


def sd3_to_single_file(bundle, *, frozen: bool = True) -> dict[str, Tensor]:
    """A bundle (MMDiT, SD3 VAE, SD3TextEncoder) -> the single-file state dict (the MMDiT only without frozen)."""
    out = mmdit_to_single_file(bundle.unet.state_dict())
    if frozen:
        out.update({VAE_PREFIX + k: v for k, v in bundle.autoencoder.state_dict().items()})
        te = bundle.text_encoder
        out.update({CLIP_L_PREFIX + k: v for k, v in clip_hub_state(te.model).items()})
        out.update({CLIP_G_PREFIX + k: v for k, v in clip_hub_state(te.model_2).items()})
        if te.t5 is not None:  # + the tied embedding under its encoder name too: diffusers' from_single_file
            t5 = t5_state(te.t5)  # fills only what the file holds (it left encoder.embed_tokens on the meta device)
            out.update({T5_PREFIX + k: v for k, v in t5.items()})
            out.update({T5_PREFIX + k: t5["shared.weight"].clone() for k in T5_TIED})
    return {k: v.detach().contiguous() for k, v in out.items()}


def sd3_header(bundle, resolution: int | None) -> dict[str, str]:
    """Our header entries: the exact configs (MMDiT, VAE, schedule, text lengths) and the resolution."""
    te = bundle.text_encoder
    header = {META_MMDIT: json.dumps(_no_checkpointing(bundle.unet.config), sort_keys=True),
              META_VAE: json.dumps(_no_checkpointing(bundle.autoencoder.config), sort_keys=True),
              META_SCHEDULE: json.dumps(dataclasses.asdict(bundle.schedule), sort_keys=True),
              META_TEXT: json.dumps({"max_length": te.max_length, "joint_dim": te.joint_dim,
                                     "t5_length": te.t5_length}, sort_keys=True)}
    if resolution:
        header[META_RESOLUTION] = str(int(resolution))
    return header


def write_sd3_single_file(bundle, path, *, frozen: bool = True, dtype=None, resolution: int | None = None) -> list[str]:
    """The SD3 single file ComfyUI loads (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``), with our exact configs in its header."""
    check_sd3(bundle)
    save_safetensors(cast_state(sd3_to_single_file(bundle, frozen=frozen), dtype), Path(path),
                     sd3_header(bundle, resolution))
    return [Path(path).name]


def _split(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _header_or(header: dict, key: str, path, infer):
    return json_object(header[key], source=f"{path} (header)", key=key) if header.get(key) else infer()


def _inferred_vae(vae: dict, path) -> dict:

    if "decoder.conv_in.weight" not in vae:
        raise CheckpointError(f"{path}: no SD3 VAE weights ({VAE_PREFIX}*); this loader needs the whole model")
    try:
        config = infer_vae_config(vae)
    except (KeyError, IndexError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot infer the VAE config from its weights ({err})") from err
    return {**config, **SD3_VAE_LATENT, "use_quant_conv": "quant_conv.weight" in vae,
            "use_post_quant_conv": "post_quant_conv.weight" in vae}


def _text_encoder_for(path, text_encoder, has_t5: bool, options: dict):
    """The SD3TextEncoder whose architecture and tokenizers the file's text weights go into: the one given, the
    folder given (an SD3 diffusers folder: tokenizer{,_2,_3}/ + text_encoder{,_2,_3}/), or SD3.5-medium's from this
    machine's hub cache (a file never makes ldm download anything)."""
    if isinstance(text_encoder, nn.Module):
        return text_encoder
    if text_encoder is None:
        folder = cached_hub_folder(DEFAULT_SD3_REPO, ["*.json", "*.txt", "*.model", "text_encoder*/*.safetensors"],
                                   source=str(path), key="text encoders (SD3 single files carry no tokenizers; "
                                                         "pass text_encoder=<an SD3 diffusers folder>)")
    else:
        folder = Path(text_encoder)
        if not folder.is_dir():
            raise FileNotFoundError(f"text_encoder: folder not found: {text_encoder}")
    return load_sd3_text_encoder(folder, use_t5=has_t5, **options)


def load_sd3_single_file(path, *, text_encoder=None):
    """An SD3 single file -> ModelBundle. Configs from our header when there (exact), else inferred from the
    tensors' shapes as ComfyUI does (64-wide heads, SD3's VAE latent format, shift 3.0); every network built on the
    meta device and filled only once the file's tensors are checked against it."""
    path = Path(path)
    header = {}
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
    state = load_state_dict(path)
    mmdit_state = mmdit_from_single_file(state)
    vae_state = _split(state, VAE_PREFIX)

    def inferred_mmdit():
        try:
            return mmdit_config_from_tensors(mmdit_state)
        except (KeyError, IndexError) as err:
            raise CheckpointError(f"{path}: cannot infer the SD3 transformer config ({err})") from err

    mmdit_cfg = _header_or(header, META_MMDIT, path, inferred_mmdit)
    vae_cfg = _header_or(header, META_VAE, path, lambda: _inferred_vae(vae_state, path))
    sched = _header_or(header, META_SCHEDULE, path, lambda: {"shift": SD3_SHIFT})
    text = check_kwargs(_header_or(header, META_TEXT, path, dict), schema_of(SD3TextOptions),
                        source=f"{path} (header)", key=META_TEXT)  # its lengths bounded as a stored config's
    source = str(path)
    unet = build_node({"_target_": "ldm.models.mmdit.MMDiT", **mmdit_cfg}, "unet", source=source, key=META_MMDIT,
                      meta=True)
    vae = build_network("autoencoder", vae_cfg, source=source, key=META_VAE, meta=True)
    schedule = build_node({"_target_": FLOW_SCHEDULE_TARGET, **sched}, "schedule", source=source, key=META_SCHEDULE)
    jobs = [(unet, mmdit_state, "transformer"), (vae, vae_state, "vae")]
    reports = [r for m, s, n in jobs if (r := mismatch_report(m, s, name=n))]
    if reports:  # nothing allocated yet: the networks are still on the meta device
        raise CheckpointError(f"cannot load {source}\n" + "\n".join(reports))
    for module, part, name in jobs:
        copy_checked(module, part, source=f"{source} ({name})")
    t5 = _split(state, T5_PREFIX) or None
    options = {k: text[k] for k in ("max_length", "t5_length") if k in text}
    options["joint_dim"] = int(unet.config["joint_attention_dim"])
    te = _text_encoder_for(path, text_encoder, t5 is not None, options)
    clips = [_split(state, CLIP_L_PREFIX), _split(state, CLIP_G_PREFIX)]
    if all(clips):
        load_text_weights_into(te, clips, t5, source=source)
    meta = {"format": "sd3_single_file"}
    if header.get(META_RESOLUTION, "").isdigit() and 0 < int(header[META_RESOLUTION]) <= 65536:
        meta["resolution"] = int(header[META_RESOLUTION])
    return ModelBundle(unet, vae, te, schedule, source=source, meta=meta)


def load_sd3_file_into(path, unet, autoencoder=None, text_encoder=None) -> None:
    """Fill configured networks (fine-tuning: ``model.pretrained=<SD3 file>``) strictly from an SD3 single file;
    every network is checked before anything is copied. The text encoders keep their own weights where the file
    has none (a file without ``text_encoders.*``)."""
    source = str(path)
    state = load_state_dict(path)
    jobs = [(unet, mmdit_from_single_file(state), "transformer")]
    if autoencoder is not None:
        jobs.append((autoencoder, _split(state, VAE_PREFIX), "vae"))
    reports = [r for m, s, n in jobs if (r := mismatch_report(m, s, name=n))]
    if reports:
        raise CheckpointError(f"cannot load {source}\n" + "\n".join(reports))
    for module, part, name in jobs:
        copy_checked(module, part, source=f"{source} ({name})")
    clips = [_split(state, CLIP_L_PREFIX), _split(state, CLIP_G_PREFIX)]
    if text_encoder is not None and all(clips):
        load_text_weights_into(text_encoder, clips, _split(state, T5_PREFIX) or None, source=source,
                               t5_required=False)  # a file without a T5: the configured one keeps its weights
