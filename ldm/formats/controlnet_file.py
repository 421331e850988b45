"""ControlNet files, reader and writer side by side: diffusers' ``ControlNetModel`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``: ``StableDiffusionControlNetPipeline`` / SDXL load it unchanged) and the
original single file (lllyasviel's ``control_v11*.safetensors``: ``control_model.*`` keys, as A1111 and ComfyUI
load it).

Our ControlNet's parameter names are the original's (``ldm.models.controlnet``), so the single file is our state
dict under ``control_model.``; the diffusers names come from a table of module prefixes built from the config (the
U-Net's encoder part of ``diffusers_keys``' table, plus the hint encoder and the zero convs), one table for both
directions. Reading is bounded like every other file: the config (``config.json``, our single file's header, or
the base U-Net's config with the hint encoder's widths read from the tensor shapes) is checked against
``ControlNetConfig``'s bounds, the network is built on the meta device, and it gets memory only once the file's
tensors have been checked against it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.formats.common import cast_state, save_safetensors, write_json
from ldm.formats.diffusers_keys import _rename, _unet_table, unet_config_from_diffusers, unet_diffusers_config
from ldm.formats.safe_build import CONTROLNET_SCHEMA, build_network, check_kwargs, check_plain
from ldm.formats.safe_load import CheckpointError, json_object, load_into, load_state_dict, read_json_file, tensor_shapes
from ldm.formats.weight_folder import read_weights

PREFIX = "control_model."  # the original single file's (cldm ControlLDM.control_model)
HEADER_KEY = "ldm_controlnet_config"  # our single file's header entry: ControlNet(**config)
WEIGHTS_STEM = "diffusion_pytorch_model"
# The settings of diffusers' ControlNetModel.__init__ that a U-Net config maps to (the rest are UNet-only)
_CONTROLNET_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
    "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
    "num_class_embeds", "upcast_attention", "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
)
# ControlNetModel settings our ControlNet implements (anything else is refused)
_CONTROLNET_FIXED = {"controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False,
                     "encoder_hid_dim": None, "encoder_hid_dim_type": None}


# ----------------------------------------------------------------------------------------------------------------
# names


def _table(config: dict) -> list[tuple[str, str, dict]]:
    """``(ours, diffusers, inner renames)`` module prefixes of a ControlNet config."""
    encoder = [row for row in _unet_table(config)
               if row[0].startswith(("time_embed.", "label_emb.", "input_blocks.", "middle_block."))]
    n = len(config["hint_channels"])
    hint = [("input_hint_block.0", "controlnet_cond_embedding.conv_in", {})]
    for k in range(n - 1):  # per width pair: conv (index 2 + 4k) then stride-2 conv (4 + 4k)
        hint += [(f"input_hint_block.{2 + 4 * k}", f"controlnet_cond_embedding.blocks.{2 * k}", {}),
                 (f"input_hint_block.{4 + 4 * k}", f"controlnet_cond_embedding.blocks.{2 * k + 1}", {})]
    hint.append((f"input_hint_block.{2 + 4 * (n - 1)}", "controlnet_cond_embedding.conv_out", {}))
    levels, nrb = len(config["channel_mult"]), config["num_res_blocks"]
    blocks = 1 + levels * nrb + (levels - 1)  # conv_in + res blocks + downsamplers
    zeros = [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", {}) for i in range(blocks)]
    return encoder + hint + zeros + [("middle_block_out.0", "controlnet_mid_block", {})]


def controlnet_to_diffusers(state: dict, config: dict) -> dict:
    """Our (original) ControlNet keys -> diffusers ``ControlNetModel`` keys."""
    return _rename(state, _table(config), True, "ControlNet (ldm -> diffusers)")


def controlnet_from_diffusers(state: dict, config: dict) -> dict:
    """diffusers ``ControlNetModel`` keys -> our (original) ControlNet keys."""
    return _rename(state, _table(config), False, "ControlNet (diffusers -> ldm)")


def controlnet_diffusers_config(config: dict) -> dict:
    """Our ControlNet kwargs -> diffusers ``ControlNetModel`` config (config.json)."""
    unet = unet_diffusers_config(config)
    return {"_class_name": "ControlNetModel", **{k: unet[k] for k in _CONTROLNET_KEYS if k in unet},
            **_CONTROLNET_FIXED, "conditioning_channels": config["conditioning_channels"],
            "conditioning_embedding_out_channels": list(config["hint_channels"])}


def controlnet_config_from_diffusers(cfg: dict) -> dict:
    """diffusers ``ControlNetModel`` config -> our ControlNet kwargs."""
    for key, want in _CONTROLNET_FIXED.items():
        if cfg.get(key, want) != want:
            raise ValueError(f"unsupported diffusers ControlNet setting {key}={cfg[key]!r} (need {want!r})")
    ours = unet_config_from_diffusers({k: v for k, v in cfg.items() if k != "up_block_types"})
    hint = cfg.get("conditioning_embedding_out_channels") or [16, 32, 96, 256]
    return {**ours, "conditioning_channels": cfg.get("conditioning_channels", 3), "hint_channels": list(hint)}


# ----------------------------------------------------------------------------------------------------------------
# reading


def _build(config: dict, *, source: str, key: str):
    """The ControlNet of a stored config on the meta device, its arguments checked against the bounds first."""
    return build_network("controlnet", config, source=source, key=key, meta=True)


def read_controlnet(path, base_unet_config: dict | None = None):
    """A ControlNet from a diffusers folder or a single ``control_model.*`` file (our header's config, else the
    base U-Net's ``base_unet_config`` with the hint encoder read from the tensor shapes)."""
    path = Path(path)
    if path.is_dir():
        return read_controlnet_folder(path)
    if path.is_file():
        return read_controlnet_single_file(path, base_unet_config)
    raise CheckpointError(f"ControlNet not found: {path} is neither a diffusers ControlNet folder nor a file")


def read_controlnet_folder(folder):
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: a diffusers ControlNet folder needs config.json")
    cfg = read_json_file(cfg_path)
    name = cfg.get("_class_name", "ControlNetModel")
    if name != "ControlNetModel":
        raise CheckpointError(f"{cfg_path}: _class_name {name!r} is not a ControlNetModel")
    check_plain({k: v for k, v in cfg.items() if not k.startswith("_")}, source=str(cfg_path), key="config")
    try:
        config = controlnet_config_from_diffusers(cfg)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_path}: unsupported config ({type(err).__name__}: {err})") from err
    net = _build(config, source=str(cfg_path), key="controlnet")
    state = controlnet_from_diffusers(read_weights(folder, WEIGHTS_STEM), net.config)
    load_into(net, state, source=str(folder))
    return net


def _hint_config(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """conditioning_channels and hint_channels from the shapes of ``input_hint_block.<i>.weight``."""
    convs = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.") and k.endswith(".weight"))
    n = len(convs) // 2  # conv_in + 2 per width pair + conv_out = 2n convs at indices 0, 2, ..., 4n - 2
    if n < 1 or convs != list(range(0, 4 * n - 1, 2)) or len(shapes[f"input_hint_block.0.weight"]) != 4:
        raise CheckpointError(f"{source}: input_hint_block holds convolutions {convs}; not a ControlNet hint encoder")
    widths = [shapes["input_hint_block.0.weight"][0]] + [shapes[f"input_hint_block.{4 + 4 * k}.weight"][0]
                                                         for k in range(n - 1)]
    return {"conditioning_channels": shapes["input_hint_block.0.weight"][1], "hint_channels": widths}


def read_controlnet_single_file(path, base_unet_config: dict | None = None):
    """``control_model.*`` keys (lllyasviel's files, ours) -> a ControlNet. Its architecture is our header's config
    when the file has one, else ``base_unet_config`` (the U-Net it controls: the original files store none) with
    the hint encoder's sizes from the tensor shapes."""
    path = Path(path)
    shapes = {k[len(PREFIX):]: s for k, s in tensor_shapes(path).items() if k.startswith(PREFIX)}
    if not shapes:
        raise CheckpointError(f"{path}: no {PREFIX}* tensors; not an original-layout ControlNet file")
    config = _header_config(path)
    if config is None:
        if base_unet_config is None:
            raise CheckpointError(f"{path}: the file stores no ControlNet config; give the base model it controls")
        unet_fields = [k for k in CONTROLNET_SCHEMA if k not in ("conditioning_channels", "hint_channels")]
        config = {**{k: v for k, v in base_unet_config.items() if k in unet_fields}, **_hint_config(shapes, str(path))}
        conv_in = shapes.get("input_blocks.0.0.weight")
        if conv_in is not None and len(conv_in) == 4:  # the latents it reads (4 also beside a 9-channel inpainting U-Net)
            config["in_channels"] = conv_in[1]
    net = _build(config, source=str(path), key=HEADER_KEY)
    state = {k[len(PREFIX):]: v for k, v in load_state_dict(path).items() if k.startswith(PREFIX)}
    load_into(net, state, source=str(path))
    return net


def _header_config(path: Path) -> dict | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - the Rust reader's errors, named with the file
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err
    if HEADER_KEY not in meta:
        return None
    stored = json_object(meta[HEADER_KEY], source=str(path), key=HEADER_KEY)
    return check_kwargs(stored, CONTROLNET_SCHEMA, source=str(path), key=HEADER_KEY)


# ----------------------------------------------------------------------------------------------------------------
# writing


def write_controlnet_folder(net, folder, dtype: torch.dtype | None = None) -> Path:
    """``folder/config.json`` + ``folder/diffusion_pytorch_model.safetensors``: ``ControlNetModel.from_pretrained``."""
    folder = Path(folder)
    write_json(folder / "config.json", controlnet_diffusers_config(net.config))
    save_safetensors(cast_state(controlnet_to_diffusers(net.state_dict(), net.config), dtype),
                     folder / f"{WEIGHTS_STEM}.safetensors")
    return folder


def write_controlnet_single_file(net, path, dtype: torch.dtype | None = None) -> Path:
    """``control_model.*`` keys (A1111, ComfyUI), with our config in the header so we read it back without the base."""
    import json

    path = Path(path)
    state = {PREFIX + k: v for k, v in net.state_dict().items()}
    save_safetensors(cast_state(state, dtype), path, metadata={HEADER_KEY: json.dumps(net.config)})
    return path
