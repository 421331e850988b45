"""SGM's (Stability-AI/generative-models) ``configs/inference/sd_xl_base.yaml`` structure for an SDXL-style model:
the original config written next to an SDXL single file, as ``original_config`` writes ``v1-inference.yaml`` for SD.

Which SGM: the one SDXL 1.0 was released with, generative-models commit 45c443b, which A1111 clones and instantiates
this yaml with (``modules/launch_utils.py`` STABLE_DIFFUSION_XL_COMMIT_HASH). Its ``UNetModel`` needs
``use_spatial_transformer: True`` (default False: attention blocks instead of transformers) and takes ``legacy``;
its ``DiscreteDenoiser`` needs a ``weighting_config``; its first stage is ``AutoencoderKLInferenceWrapper``. The
SGM of November 2023 on (Stable Video Diffusion) dropped those three arguments and that class: its own
``sd_xl_base.yaml`` omits them. diffusers' ``from_single_file`` and ComfyUI read only sizes, which both share.

What SGM's inference config can say about the noise schedule (``sgm/modules/diffusionmodules/``):
``DiscreteDenoiser(num_idx)`` with ``LegacyDDPMDiscretization(linear_start, linear_end, num_timesteps)``, whose betas
are always ``make_beta_schedule("linear")`` (linear in sqrt(beta): our ``scaled_linear``), and the scaling
``EpsScaling`` (epsilon) or ``VScaling`` (v-prediction; ``sd_2_1_768.yaml``). Other schedule kinds and x0 prediction
have no SGM class: :func:`check_sgm_schedule` refuses them. Zero terminal SNR has none either; the weights are
still right for a sampler that rescales, so it is said in a comment (as for SD).
"""

from __future__ import annotations

from typing import Any

from ldm.diffusion.schedules import NoiseSchedule
from ldm.formats.common import ExportError

SGM_SCALINGS = {"epsilon": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling",
                "v_prediction": "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"}
SGM_WEIGHTINGS = {"epsilon": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting",  # sd_xl_base.yaml
                  "v_prediction": "sgm.modules.diffusionmodules.denoiser_weighting.VWeighting"}  # sd_2_1_768.yaml
SGM_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")  # the "vector" inputs
SGM_SIZE_EMBED_DIM = 256  # ConcatTimestepEmbedderND outdim (per value) in sd_xl_base.yaml
SDXL_OPENCLIP = {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k"}  # FrozenOpenCLIPEmbedder2 in sd_xl_base.yaml


def check_sgm_schedule(schedule: NoiseSchedule) -> None:
    """Refuse a schedule that SGM's ``LegacyDDPMDiscretization`` + Eps/VScaling cannot express."""
    if schedule.kind != "scaled_linear":
        raise ExportError(f"the noise schedule is {schedule.kind!r}; SGM's sd_xl_base.yaml (LegacyDDPMDiscretization) "
                          "only has SD's scaled_linear betas: use --format diffusers or ldm")
    if schedule.prediction_type not in SGM_SCALINGS:
        raise ExportError(f"prediction_type {schedule.prediction_type!r} has no SGM denoiser scaling (only "
                          f"{sorted(SGM_SCALINGS)}): use --format diffusers or ldm")


def size_embed_dim(adm_in_channels: int, pooled_dim: int) -> int:
    """``ConcatTimestepEmbedderND`` outdim from ``adm_in_channels = pooled + 3 inputs x 2 values x outdim``."""
    rest = adm_in_channels - pooled_dim
    if rest <= 0 or rest % (2 * len(SGM_SIZE_KEYS)):
        raise ExportError(f"adm_in_channels {adm_in_channels} is not the pooled text width {pooled_dim} plus 6 size "
                          "embeddings: SGM's GeneralConditioner cannot build this U-Net's vector input")
    return rest // (2 * len(SGM_SIZE_KEYS))


def unet_size_params(c: dict) -> dict:
    """The U-Net sizes both original configs write (CompVis ``UNetModel`` and SGM's): channels, levels, the
    attention resolutions (``[2**level]`` of the levels with attention, largest first)."""
    return {
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "model_channels": c["model_channels"],
        "attention_resolutions": sorted((2**lvl for lvl in c["attention_levels"]), reverse=True),
        "num_res_blocks": c["num_res_blocks"],
        "channel_mult": list(c["channel_mult"]),
    }


def _unet_params(c: dict, heads: dict) -> dict[str, Any]:
    """``network_config`` params (``sgm.modules.diffusionmodules.openaimodel.UNetModel``)."""
    levels = len(c["channel_mult"])
    depth = c.get("transformer_depth", 1)
    depths = [int(depth)] * levels if isinstance(depth, int) else [int(d) for d in depth]
    # a level without attention has no transformer: sd_xl_base.yaml writes 1 there (unused), as diffusers does
    depths = [d if lvl in c["attention_levels"] else 1 for lvl, d in enumerate(depths)]
    return {
        "adm_in_channels": int(c["adm_in_channels"]),
        "num_classes": "sequential",
        "use_checkpoint": True,
        **unet_size_params(c),
        **heads,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(c.get("use_linear_projection", False)),
        "transformer_depth": depths,  # the middle block takes the last (SGM transformer_depth_middle default)
        "context_dim": c["context_dim"],
        "spatial_transformer_attn_type": "softmax-xformers",
        "legacy": False,
    }


def _conditioner(vit_l_layers: int, outdim: int) -> dict[str, Any]:
    """``GeneralConditioner``: ViT-L's penultimate hidden state (``hidden_states[layers - 1]``), bigG's
    penultimate + pooled, and the three size inputs (SGM ``sgm/modules/encoders/modules.py``)."""
    sizes = [{"is_trainable": False, "input_key": key,
              "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": outdim}}
             for key in SGM_SIZE_KEYS]
    return {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         "params": {"layer": "hidden", "layer_idx": vit_l_layers - 1}},
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": {**SDXL_OPENCLIP, "freeze": True, "layer": "penultimate", "always_return_pooled": True,
                    "legacy": False}},
        *sizes,
    ]}}


def first_stage_params(vae_config: dict, resolution: int, **ddconfig_extra: Any) -> dict[str, Any]:
    """The ``params`` of the original configs' first stage (CompVis ``AutoencoderKL`` / SGM's wrapper; the same
    ``ddconfig``), from our VAE config; ``ddconfig_extra`` come first in ``ddconfig`` (SGM: ``attn_type``)."""
    latent_channels = vae_config.get("latent_channels", 4)
    return {
        "embed_dim": latent_channels,
        "monitor": "val/rec_loss",
        "ddconfig": {
            **ddconfig_extra,
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


def _first_stage(vae_config: dict, resolution: int) -> dict[str, Any]:
    return {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
            "params": first_stage_params(vae_config, resolution, attn_type="vanilla-xformers")}


def sgm_config(unet_config: dict, vae_config: dict, schedule: NoiseSchedule, *, heads: dict, vit_l_layers: int,
               pooled_dim: int, resolution: int = 1024) -> dict:
    """The ``sd_xl_base.yaml`` dict of a model (``heads``: the U-Net's ``num_heads`` / ``num_head_channels`` entries,
    as ``single_file._original_heads`` derives them; ``vit_l_layers``: depth of the first text encoder;
    ``pooled_dim``: the second one's projection width). Values come from our configs; nothing is copied."""
    check_sgm_schedule(schedule)
    if not unet_config.get("adm_in_channels"):
        raise ExportError("the U-Net has no adm_in_channels (no SDXL vector input): it is not an SDXL model")
    outdim = size_embed_dim(int(unet_config["adm_in_channels"]), pooled_dim)
    discretization = {"linear_start": float(schedule.beta_start), "linear_end": float(schedule.beta_end),
                      "num_timesteps": schedule.num_train_timesteps}
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": float(vae_config.get("scaling_factor", 0.13025)),
        "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": schedule.num_train_timesteps,
            "weighting_config": {"target": SGM_WEIGHTINGS[schedule.prediction_type]},
            "scaling_config": {"target": SGM_SCALINGS[schedule.prediction_type]},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization",
                                      "params": discretization},
        }},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
                           "params": _unet_params(unet_config, heads)},
        "conditioner_config": _conditioner(vit_l_layers, outdim),
        "first_stage_config": _first_stage(vae_config, resolution),
    }}}
