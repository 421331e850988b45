"""Writers for the formats other tools read: a diffusers ``StableDiffusionPipeline`` folder, and an original
Stable Diffusion single file with its ``v1-inference.yaml``-style config.

Writers take a :class:`~ldm.formats.bundle.ModelBundle` and never modify it: weights are read from ``state_dict()`` and cast
on the way out (``dtype``), so exporting fp16 leaves the caller's fp32 modules as they were.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from ldm.formats.bundle import ModelBundle
from ldm.diffusion.schedules import NoiseSchedule

# Our schedule kinds -> diffusers' beta_schedule names, and -> the original ldm code's (``make_beta_schedule``).
# The original "linear" is linear in sqrt(beta): our scaled_linear (SD); our linear (DDPM) is its "sqrt_linear".
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
ORIGINAL_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}
ORIGINAL_PARAMETERIZATION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# diffusers' defaults for the betas of a cosine schedule (unused by squaredcos_cap_v2, but the field is a float).
_DIFFUSERS_BETA_DEFAULTS = (0.0001, 0.02)
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers whose classes read these configs (pyproject's floor)
SD_NORM_GROUPS = 32  # the original VAE's GroupNorm groups: fixed in its code, absent from its yaml
SD1_EMBEDDER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
SD2_EMBEDDER = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"


class ExportError(ValueError):
    """The model cannot be written in the asked format, or the output path is not writable as asked."""


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; floating ones cast to ``dtype`` (None keeps them)."""
    out = {}
    for key, value in state.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.to("cpu").contiguous()
    return out


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates 0600 files; others (a ComfyUI server) must read them


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def schedule_kwargs(schedule: NoiseSchedule) -> dict:
    """``NoiseSchedule.make`` arguments that rebuild ``schedule`` exactly."""
    check_schedule(schedule)
    return {"kind": schedule.kind, "num_train_timesteps": schedule.num_train_timesteps,
            "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
            "rescale_zero_terminal_snr": bool(schedule.zero_terminal_snr),
            "prediction_type": schedule.prediction_type}


def check_schedule(schedule: NoiseSchedule) -> None:
    if schedule.kind not in DIFFUSERS_BETA_SCHEDULES:
        raise ExportError(f"the noise schedule is {schedule.kind!r}: only the named schedules "
                          f"{sorted(DIFFUSERS_BETA_SCHEDULES)} (NoiseSchedule.make) can be written into a config")


def is_kl_autoencoder(module) -> bool:
    from ldm.models.autoencoder import AutoencoderKL

    return isinstance(module, AutoencoderKL)


def text_model(text_encoder):
    """The transformers ``CLIPTextModel`` inside our ``CLIPTextEncoder``."""
    return getattr(text_encoder, "model", text_encoder)


def _no_checkpointing(config: dict) -> dict:
    """A module config for an exported model: training-only switches off."""
    return {**config, "gradient_checkpointing": False} if "gradient_checkpointing" in config else dict(config)


# ----------------------------------------------------------------------------------------------------------------
# diffusers


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

    model = text_model(text_encoder)
    config = copy.deepcopy(model.config)
    state = to_hub_keys(model.state_dict())
    if drop_unused_last_layer and getattr(text_encoder, "penultimate", False):
        last = config.num_hidden_layers - 1
        state = {k: v for k, v in state.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}
        config.num_hidden_layers = last
    config.architectures = ["CLIPTextModel"]
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


def write_diffusers(bundle: ModelBundle, folder: Path, *, frozen: bool = True, dtype: torch.dtype | None = None,
                    resolution: int = 512) -> list[str]:
    """A ``StableDiffusionPipeline`` folder; ``frozen=False`` writes only ``unet/``, ``scheduler/`` and
    ``model_index.json``. Returns the written entries."""
    from ldm.formats.diffusers_keys import (
        unet_diffusers_config,
        unet_ldm_to_diffusers,
        vae_diffusers_config,
        vae_ldm_to_diffusers,
    )

    check_diffusers(bundle)
    folder = Path(folder)
    vae = bundle.autoencoder
    latent_size = resolution // vae.downsample_factor
    unet_cfg = _no_checkpointing(bundle.unet.config)
    write_json(folder / "unet" / "config.json", unet_diffusers_config(unet_cfg, latent_size))
    save_safetensors(cast_state(unet_ldm_to_diffusers(bundle.unet.state_dict(), unet_cfg), dtype),
                     folder / "unet" / "diffusion_pytorch_model.safetensors")
    written = ["unet/"]
    if frozen:
        write_json(folder / "vae" / "config.json", vae_diffusers_config(vae.config, resolution))
        save_safetensors(cast_state(vae_ldm_to_diffusers(vae.state_dict(), vae.config), dtype),
                         folder / "vae" / "diffusion_pytorch_model.safetensors")
        written.append("vae/")
        written += write_hub_text_encoder(bundle.text_encoder, folder, dtype, drop_unused_last_layer=True)
    write_json(folder / "scheduler" / "scheduler_config.json", diffusers_scheduler_config(bundle.schedule))
    write_json(folder / "model_index.json", model_index())
    return written + ["scheduler/", "model_index.json"]


def check_diffusers(bundle: ModelBundle) -> None:
    """What a StableDiffusionPipeline cannot represent, found before anything is written."""
    if not is_kl_autoencoder(bundle.autoencoder):
        raise ExportError("a pixel-space model (no AutoencoderKL) cannot be written as a StableDiffusionPipeline; "
                          "use --format ldm")
    if bundle.text_encoder is None:
        raise ExportError("the model has no text encoder; a StableDiffusionPipeline needs one (use --format ldm)")
    check_schedule(bundle.schedule)


# ----------------------------------------------------------------------------------------------------------------
# original single file + config


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
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "model_channels": c["model_channels"],
        "attention_resolutions": sorted((2**lvl for lvl in c["attention_levels"]), reverse=True),
        "num_res_blocks": c["num_res_blocks"],
        "channel_mult": list(c["channel_mult"]),
        **_original_heads(c),
        "use_spatial_transformer": True,
        "transformer_depth": c.get("transformer_depth", 1),
        "context_dim": c["context_dim"],
        "legacy": False,
    }
    if c.get("use_linear_projection"):
        unet_params["use_linear_in_transformer"] = True
    vae_params = {
        "embed_dim": latent_channels,
        "monitor": "val/rec_loss",
        "ddconfig": {
            "double_z": True,
            "z_channels": latent_channels,
            "resolution": resolution,
            "in_channels": vae_config.get("in_channels", 3),
            "out_ch": vae_config.get("out_channels", 3),
            "ch": vae_config["base_channels"],
            "ch_mult": list(vae_config["channel_mult"]),
            "num_res_blocks": vae_config["num_res_blocks"],
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }
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


def original_config_yaml(config: dict, schedule: NoiseSchedule, source: str = "") -> str:
    import yaml

    lines = ["# Original Stable Diffusion (CompVis ldm) config of the weights next to this file.",
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
    if not is_kl_autoencoder(bundle.autoencoder):
        raise ExportError("a pixel-space model (no AutoencoderKL) has no Stable Diffusion single-file layout; "
                          "use --format ldm")
    if bundle.text_encoder is None:
        raise ExportError("the model has no text encoder; SD single files need one (use --format ldm)")
    check_schedule(bundle.schedule)
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


def single_file_header(bundle: ModelBundle, resolution: int, dtype: torch.dtype | None) -> dict[str, str]:
    """safetensors header entries that let ``ldm.formats.load.load_bundle`` rebuild the model exactly (the U-Net / VAE
    configs, schedule, resolution); other tools ignore them."""
    from ldm.formats.load import META_RESOLUTION, META_SCHEDULE, META_UNET, META_VAE

    return {
        META_UNET: json.dumps(_no_checkpointing(bundle.unet.config), sort_keys=True),
        META_VAE: json.dumps(_no_checkpointing(bundle.autoencoder.config), sort_keys=True),
        META_SCHEDULE: json.dumps(schedule_kwargs(bundle.schedule), sort_keys=True),
        META_RESOLUTION: str(int(resolution)),
        "ldm_text_encoder": json.dumps({"penultimate": bool(getattr(bundle.text_encoder, "penultimate", False)),
                                        "config": text_model(bundle.text_encoder).config.to_diff_dict()},
                                       sort_keys=True, default=str),
        "ldm_dtype": str(dtype or next(bundle.unet.parameters()).dtype).removeprefix("torch."),
    }


def write_single_file(bundle: ModelBundle, path: Path, yaml_path: Path, *, frozen: bool = True,
                      dtype: torch.dtype | None = None, resolution: int = 512) -> list[str]:
    """An SD-layout ``.safetensors`` (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``;
    U-Net only when ``frozen=False``) and its original config at ``yaml_path``."""
    from ldm.formats.single_file import text_encoder_layout, to_single_file

    check_single_file(bundle)
    te = bundle.text_encoder
    layout = text_encoder_layout(te)
    state = to_single_file(bundle.unet, bundle.autoencoder if frozen else None, te if frozen else None, layout=layout)
    save_safetensors(cast_state(state, dtype), Path(path), single_file_header(bundle, resolution, dtype))
    config = original_config(_no_checkpointing(bundle.unet.config), bundle.autoencoder.config, bundle.schedule,
                             text_layout=layout, resolution=resolution, text_layer=text_layer_for(te))
    Path(yaml_path).write_text(original_config_yaml(config, bundle.schedule, bundle.source), encoding="utf-8")
    return [Path(path).name, Path(yaml_path).name]
