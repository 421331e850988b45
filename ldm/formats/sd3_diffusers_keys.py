"""The SD3 / SD3.5 transformer in diffusers' layout (``SD3Transformer2DModel``), read and written: key and config
maps between our MMDiT (the original SD3 checkpoint names, ``ldm.models.mmdit``) and diffusers', and the
``transformer/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) through the bounded loaders.

The names follow diffusers' own single-file converter (``convert_sd3_transformer_checkpoint_to_diffusers``):
fused ``attn.qkv`` <-> ``to_q`` / ``to_k`` / ``to_v`` (``add_{q,k,v}_proj`` for the text stream), and the
adaLN of the final layer and of the last block's pre-only text stream stored as (shift, scale) by the original
code and as (scale, shift) by diffusers' AdaLayerNormContinuous: those two are swapped. Each direction is the
exact inverse of the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ldm.formats.common import cast_state, save_safetensors, write_json
from ldm.formats.safe_build import build_node, check_plain
from ldm.formats.safe_load import CheckpointError, load_into, read_json_file
from ldm.formats.weight_folder import read_weights

MMDIT_TARGET = "ldm.models.mmdit.MMDiT"
_METADATA = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")

# Plain renames, ours -> diffusers (whole prefixes; the parameter suffix .weight / .bias is kept)
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}


def _block_table(i: int, last: bool, dual: bool, qk_norm: bool) -> tuple[dict[str, str], dict[str, tuple[str, ...]],
                                                                          set[str]]:
    """(renames, qkv splits, swapped adaLN prefixes) of joint block i, ours -> diffusers."""
    o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
    renames = {f"{o}.x_block.attn.proj": f"{d}.attn.to_out.0",
               f"{o}.x_block.adaLN_modulation.1": f"{d}.norm1.linear",
               f"{o}.context_block.adaLN_modulation.1": f"{d}.norm1_context.linear",
               f"{o}.x_block.mlp.fc1": f"{d}.ff.net.0.proj", f"{o}.x_block.mlp.fc2": f"{d}.ff.net.2"}
    splits = {f"{o}.x_block.attn.qkv": (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"),
              f"{o}.context_block.attn.qkv": (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj",
                                              f"{d}.attn.add_v_proj")}
    if not last:
        renames |= {f"{o}.context_block.attn.proj": f"{d}.attn.to_add_out",
                    f"{o}.context_block.mlp.fc1": f"{d}.ff_context.net.0.proj",
                    f"{o}.context_block.mlp.fc2": f"{d}.ff_context.net.2"}
    if qk_norm:
        renames |= {f"{o}.x_block.attn.ln_q": f"{d}.attn.norm_q", f"{o}.x_block.attn.ln_k": f"{d}.attn.norm_k",
                    f"{o}.context_block.attn.ln_q": f"{d}.attn.norm_added_q",
                    f"{o}.context_block.attn.ln_k": f"{d}.attn.norm_added_k"}
    if dual:
        renames[f"{o}.x_block.attn2.proj"] = f"{d}.attn2.to_out.0"
        splits[f"{o}.x_block.attn2.qkv"] = (f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v")
        if qk_norm:
            renames |= {f"{o}.x_block.attn2.ln_q": f"{d}.attn2.norm_q", f"{o}.x_block.attn2.ln_k": f"{d}.attn2.norm_k"}
    swapped = {f"{o}.context_block.adaLN_modulation.1"} if last else set()
    return renames, splits, swapped


def _tables(config: dict) -> tuple[dict[str, str], dict[str, tuple[str, ...]], set[str]]:
    renames = dict(_TOP)
    renames["final_layer.adaLN_modulation.1"] = "norm_out.linear"
    splits: dict[str, tuple[str, ...]] = {}
    swapped = {"final_layer.adaLN_modulation.1"}
    n = config["num_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    for i in range(n):
        r, s, w = _block_table(i, i == n - 1, i in dual, config.get("qk_norm") is not None)
        renames |= r
        splits |= s
        swapped |= w
    return renames, splits, swapped


def swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) <-> (scale, shift) along the output axis (its own inverse)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def mmdit_to_diffusers(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Our MMDiT state dict -> diffusers' SD3Transformer2DModel state dict."""
    renames, splits, swapped = _tables(config)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
            continue
        prefix, _, suffix = key.rpartition(".")
        if prefix in splits:
            for name, part in zip(splits[prefix], value.chunk(3, dim=0)):
                out[f"{name}.{suffix}"] = part.clone()
        elif prefix in renames:
            out[f"{renames[prefix]}.{suffix}"] = swap_halves(value) if prefix in swapped else value
        else:
            raise CheckpointError(f"MMDiT parameter {key!r} has no diffusers name (config {config})")
    return out


def mmdit_from_diffusers(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """diffusers' SD3Transformer2DModel state dict -> ours; every expected key must be there."""
    renames, splits, swapped = _tables(config)
    inverse = {v: k for k, v in renames.items()}
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in state_dict:
            raise CheckpointError(f"diffusers SD3 transformer: missing {name!r}")
        used.add(name)
        return state_dict[name]

    out["pos_embed"] = take("pos_embed.pos_embed")
    for ours, names in splits.items():
        for suffix in ("weight", "bias"):
            out[f"{ours}.{suffix}"] = torch.cat([take(f"{n}.{suffix}") for n in names], dim=0)
    for theirs, ours in inverse.items():
        is_rms = ours.rpartition(".")[2] in ("ln_q", "ln_k")  # RMSNorm: a weight, no bias
        for suffix in ("weight",) if is_rms else ("weight", "bias"):
            value = take(f"{theirs}.{suffix}")
            out[f"{ours}.{suffix}"] = swap_halves(value) if ours in swapped else value
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise CheckpointError(f"diffusers SD3 transformer: unexpected keys {unknown[:5]}"
                              f"{' ...' if len(unknown) > 5 else ''} for the config {config}")
    return out


def mmdit_module_names(config: dict) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Our MMDiT module path -> (its diffusers module path(s), output halves swapped): one name for a renamed layer,
    three (q, k, v) for a fused ``attn.qkv`` whose output rows diffusers splits into ``to_q`` / ``to_k`` / ``to_v``
    (``add_{q,k,v}_proj``). What a LoRA file in diffusers' layout names (ldm.formats.lora_peft); the same tables as
    the state-dict maps above."""
    renames, splits, swapped = _tables(config)
    out = {ours: ((theirs,), ours in swapped) for ours, theirs in renames.items()}
    out.update({ours: (tuple(names), False) for ours, names in splits.items()})
    return out


# Our MMDiTConfig fields -> diffusers' SD3Transformer2DModel config (the same names, + caption_projection_dim)
_CONFIG_FIELDS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                  "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "out_channels",
                  "pos_embed_max_size", "dual_attention_layers", "qk_norm")


def mmdit_diffusers_config(config: dict) -> dict:
    """diffusers' transformer/config.json values of our MMDiT config."""
    out = {k: config[k] for k in _CONFIG_FIELDS}
    out["dual_attention_layers"] = list(out["dual_attention_layers"])
    out["caption_projection_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    return out


def mmdit_config_from_diffusers(cfg: dict) -> dict:
    """Our MMDiT config from diffusers' transformer/config.json (its caption_projection_dim must be the width)."""
    missing = [k for k in _CONFIG_FIELDS if k not in cfg and k not in ("dual_attention_layers", "qk_norm")]
    if missing:
        raise CheckpointError(f"diffusers SD3 transformer config: missing {missing}")
    out = {k: cfg.get(k) for k in _CONFIG_FIELDS}
    out["dual_attention_layers"] = tuple(out["dual_attention_layers"] or ())
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg.get("caption_projection_dim", width) != width:
        raise CheckpointError(f"diffusers SD3 transformer config: caption_projection_dim "
                              f"{cfg['caption_projection_dim']} differs from the width {width} (heads x head dim): "
                              "the joint attention needs them equal")
    return out


# ---------------------------------------------------------------------------------------------- the folder


def write_transformer_folder(folder, class_name: str, config: dict, state: dict[str, Tensor],
                             dtype: torch.dtype | None = None) -> Path:
    """A diffusers ``transformer/`` folder: ``config.json`` (``_class_name`` + ``config``) and
    ``diffusion_pytorch_model.safetensors`` (``state``, in diffusers' names, cast to ``dtype``)."""
    folder = Path(folder)
    write_json(folder / "config.json", {"_class_name": class_name, **config})
    save_safetensors(cast_state(state, dtype), folder / "diffusion_pytorch_model.safetensors")
    return folder


def read_transformer_folder(folder, target: str, config_from: Callable[[dict], dict],
                            from_diffusers: Callable[[dict, dict], dict], variant: str | None = None) -> nn.Module:
    """Our transformer (``target``) from a diffusers ``transformer/`` folder: its config checked (plain values within
    the network config's bounds) and the network built on the meta device, then filled from the weights (mapped by
    ``from_diffusers(state, config)``) only if every tensor fits."""
    folder = Path(folder)
    path = folder / "config.json"
    config = read_json_file(path)
    check_plain({k: v for k, v in config.items() if k not in _METADATA}, source=str(path), key="config")
    node = {"_target_": target, **{k: list(v) if isinstance(v, tuple) else v for k, v in config_from(config).items()}}
    net = build_node(node, "unet", source=str(path), key="transformer", meta=True)
    load_into(net, from_diffusers(read_weights(folder, "diffusion_pytorch_model", variant), net.config),
              source=str(folder))
    return net


def write_sd3_transformer(mmdit: nn.Module, folder, dtype: torch.dtype | None = None) -> Path:
    """A diffusers SD3 folder's ``transformer/``, which ``SD3Transformer2DModel.from_pretrained`` loads unchanged."""
    return write_transformer_folder(folder, "SD3Transformer2DModel", mmdit_diffusers_config(mmdit.config),
                                    mmdit_to_diffusers(mmdit.state_dict(), mmdit.config), dtype)


def read_sd3_transformer(folder, variant: str | None = None) -> nn.Module:
    """Our MMDiT from a diffusers SD3 folder's ``transformer/`` (bounded: ``read_transformer_folder``)."""
    return read_transformer_folder(folder, MMDIT_TARGET, mmdit_config_from_diffusers, mmdit_from_diffusers, variant)
