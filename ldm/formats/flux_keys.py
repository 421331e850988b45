"""Flux.1's transformer in diffusers' layout (``FluxTransformer2DModel``: a ``transformer/`` folder) and in Black
Forest Labs' original layout (``flux1-dev.safetensors``: ``double_blocks.0.img_attn.qkv.weight``, what ComfyUI loads,
with or without its ``model.diffusion_model.`` prefix), read and written, to and from our ``ldm.models.flux.Flux``.

diffusers' names follow its own single-file converter (``convert_flux_transformer_checkpoint_to_diffusers``):
a double block's fused ``qkv`` <-> ``to_q`` / ``to_k`` / ``to_v`` (``add_{q,k,v}_proj`` for the text stream), a single
block's ``linear1`` <-> ``to_q`` / ``to_k`` / ``to_v`` / ``proj_mlp``, and the final adaLN stored (shift, scale) by BFL
and by us, (scale, shift) by diffusers' AdaLayerNormContinuous: swapped. BFL's names are ours renamed one to one
(its QK RMSNorm weights are called ``scale``). Each direction is the exact inverse of the other.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.formats.common import cast_state, save_safetensors
from ldm.formats.safe_build import build_node
from ldm.formats.safe_load import CheckpointError, load_into, load_state_dict
from ldm.formats.sd3_diffusers_keys import read_transformer_folder, swap_halves, write_transformer_folder

FLUX_TARGET = "ldm.models.flux.Flux"
SINGLE_FILE_PREFIX = "model.diffusion_model."  # ComfyUI's checkpoints; BFL's own release files have none
_WB = ("weight", "bias")


def _linear(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{s}": f"{theirs}.{s}" for s in _WB}


# ------------------------------------------------------------------------------------------ BFL's original layout


def _bfl_table(config: dict) -> dict[str, str]:
    """Our parameter names -> BFL's, for this config (a plain rename of every parameter)."""
    out: dict[str, str] = {}
    for ours, theirs in (("img_in", "img_in"), ("txt_in", "txt_in"), ("final_layer.linear", "final_layer.linear"),
                         ("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1")):
        out |= _linear(ours, theirs)
    embedders = ["time_in", "vector_in"] + (["guidance_in"] if config.get("guidance_embeds") else [])
    for name in embedders:
        out |= _linear(f"{name}.mlp.0", f"{name}.in_layer") | _linear(f"{name}.mlp.2", f"{name}.out_layer")
    for i in range(config["num_layers"]):
        for stream, s in (("x_block", "img"), ("context_block", "txt")):
            o, b = f"double_blocks.{i}.{stream}", f"double_blocks.{i}.{s}"
            out |= (_linear(f"{o}.adaLN_modulation.1", f"{b}_mod.lin") | _linear(f"{o}.attn.qkv", f"{b}_attn.qkv")
                    | _linear(f"{o}.attn.proj", f"{b}_attn.proj") | _linear(f"{o}.mlp.fc1", f"{b}_mlp.0")
                    | _linear(f"{o}.mlp.fc2", f"{b}_mlp.2"))
            out[f"{o}.attn.ln_q.weight"] = f"{b}_attn.norm.query_norm.scale"
            out[f"{o}.attn.ln_k.weight"] = f"{b}_attn.norm.key_norm.scale"
    for i in range(config["num_single_layers"]):
        o = f"single_blocks.{i}"
        out |= (_linear(f"{o}.adaLN_modulation.1", f"{o}.modulation.lin") | _linear(f"{o}.linear1", f"{o}.linear1")
                | _linear(f"{o}.linear2", f"{o}.linear2"))
        out[f"{o}.ln_q.weight"] = f"{o}.norm.query_norm.scale"
        out[f"{o}.ln_k.weight"] = f"{o}.norm.key_norm.scale"
    return out


def flux_bfl_module_paths(paths: list[str], config: dict) -> dict[str, str]:
    """Our Linear module paths -> BFL's (``double_blocks.0.x_block.attn.qkv`` -> ``double_blocks.0.img_attn.qkv``):
    the names kohya's Flux LoRAs use (``lora_unet_double_blocks_0_img_attn_qkv``)."""
    table = _bfl_table(config)
    return {p: table[f"{p}.weight"][: -len(".weight")] for p in paths}


def flux_to_bfl(state_dict: dict[str, Tensor], config: dict, prefix: str = "") -> dict[str, Tensor]:
    """Our Flux state dict -> BFL's keys (``prefix="model.diffusion_model."``: ComfyUI's checkpoint layout)."""
    table = _bfl_table(config)
    unknown = sorted(set(state_dict) - set(table))
    if unknown:
        raise CheckpointError(f"Flux parameters {unknown[:5]} have no BFL name (config {config})")
    return {prefix + table[k]: v for k, v in state_dict.items()}


def flux_from_bfl(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """BFL's keys (bare or under ``model.diffusion_model.``; other components such as ``vae.*`` left out) -> ours;
    every expected key must be there and no other transformer key."""
    state = strip_single_file_prefix(state_dict)
    table = _bfl_table(config)
    missing = sorted(v for v in table.values() if v not in state)
    if missing:
        raise CheckpointError(f"Flux (BFL layout): missing {missing[:5]}{' ...' if len(missing) > 5 else ''} for "
                              f"the config {config}")
    unknown = sorted(set(state) - set(table.values()))
    if unknown:
        raise CheckpointError(f"Flux (BFL layout): unexpected keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                              f"for the config {config}")
    return {ours: state[theirs] for ours, theirs in table.items()}


def strip_single_file_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ComfyUI checkpoint's transformer (``model.diffusion_model.*``) or a bare BFL file, as bare keys."""
    if any(k.startswith(SINGLE_FILE_PREFIX) for k in state_dict):
        return {k[len(SINGLE_FILE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(SINGLE_FILE_PREFIX)}
    return dict(state_dict)


def flux_config_from_bfl(state: dict[str, Tensor], attention_head_dim: int = 128,
                         axes_dims_rope: tuple[int, ...] = (16, 56, 56)) -> dict:
    """Our Flux config from BFL-layout tensors' shapes (as diffusers' single-file loader infers it). The head width
    and the rotary axes are not in the tensors: Flux.1's are 128 = 16 + 56 + 56."""
    state = strip_single_file_prefix(state)
    if "img_in.weight" not in state:
        raise CheckpointError("no Flux transformer here (no img_in.weight, bare or under model.diffusion_model.)")
    dim, packed = state["img_in.weight"].shape
    if dim % attention_head_dim or packed % 4:
        raise CheckpointError(f"Flux: img_in {tuple(state['img_in.weight'].shape)} is not (heads x "
                              f"{attention_head_dim}, 4 x latent channels)")

    def count(kind: str) -> int:
        found = {int(m.group(1)) for k in state if (m := re.match(rf"{kind}\.(\d+)\.", k))}
        if found != set(range(len(found))):
            raise CheckpointError(f"Flux: {kind} are not numbered 0..N-1")
        return len(found)

    return dict(in_channels=packed // 4, out_channels=state["final_layer.linear.weight"].shape[0] // 4, patch_size=2,
                num_layers=count("double_blocks"), num_single_layers=count("single_blocks"),
                attention_head_dim=attention_head_dim, num_attention_heads=dim // attention_head_dim,
                joint_attention_dim=state["txt_in.weight"].shape[1],
                pooled_projection_dim=state["vector_in.in_layer.weight"].shape[1],
                guidance_embeds="guidance_in.in_layer.weight" in state, axes_dims_rope=tuple(axes_dims_rope))


def read_flux_single_file(path, attention_head_dim: int = 128,
                          axes_dims_rope: tuple[int, ...] = (16, 56, 56)) -> nn.Module:
    """Our Flux from a BFL / ComfyUI safetensors file through the bounded loaders: the config inferred from the
    tensors' shapes is checked against FluxConfig's bounds and built on the meta device before it is filled."""
    state = strip_single_file_prefix(load_state_dict(path))
    config = flux_config_from_bfl(state, attention_head_dim, axes_dims_rope)
    node = {"_target_": FLUX_TARGET, **config, "axes_dims_rope": list(config["axes_dims_rope"])}
    flux = build_node(node, "unet", source=str(path), key="transformer", meta=True)
    load_into(flux, flux_from_bfl(state, flux.config), source=str(path))
    return flux


def write_flux_single_file(flux: nn.Module, path, prefix: str = "", dtype: torch.dtype | None = None) -> Path:
    """BFL's layout (``prefix="model.diffusion_model."``: ComfyUI's checkpoint keys) as one safetensors file."""
    path = Path(path)
    save_safetensors(cast_state(flux_to_bfl(flux.state_dict(), flux.config, prefix), dtype), path)
    return path


# ------------------------------------------------------------------------------------------------- diffusers


def _diffusers_tables(config: dict) -> tuple[dict[str, str], dict[str, list[tuple[str, int]]], set[str]]:
    """(renames, splits, swapped) ours -> diffusers, by full parameter name: a split is a list of (diffusers name,
    rows) taken in order along the output axis; a swapped parameter has its (shift, scale) halves exchanged."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * dim
    renames = (_linear("img_in", "x_embedder") | _linear("txt_in", "context_embedder")
               | _linear("final_layer.linear", "proj_out")
               | _linear("final_layer.adaLN_modulation.1", "norm_out.linear"))
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if config.get("guidance_embeds"):
        embedders.append(("guidance_in", "guidance_embedder"))
    for ours, theirs in embedders:
        renames |= (_linear(f"{ours}.mlp.0", f"time_text_embed.{theirs}.linear_1")
                    | _linear(f"{ours}.mlp.2", f"time_text_embed.{theirs}.linear_2"))
    splits: dict[str, list[tuple[str, int]]] = {}
    for i in range(config["num_layers"]):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        renames |= (_linear(f"{o}.x_block.adaLN_modulation.1", f"{d}.norm1.linear")
                    | _linear(f"{o}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear")
                    | _linear(f"{o}.x_block.attn.proj", f"{d}.attn.to_out.0")
                    | _linear(f"{o}.context_block.attn.proj", f"{d}.attn.to_add_out")
                    | _linear(f"{o}.x_block.mlp.fc1", f"{d}.ff.net.0.proj")
                    | _linear(f"{o}.x_block.mlp.fc2", f"{d}.ff.net.2")
                    | _linear(f"{o}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj")
                    | _linear(f"{o}.context_block.mlp.fc2", f"{d}.ff_context.net.2"))
        renames |= {f"{o}.x_block.attn.ln_q.weight": f"{d}.attn.norm_q.weight",
                    f"{o}.x_block.attn.ln_k.weight": f"{d}.attn.norm_k.weight",
                    f"{o}.context_block.attn.ln_q.weight": f"{d}.attn.norm_added_q.weight",
                    f"{o}.context_block.attn.ln_k.weight": f"{d}.attn.norm_added_k.weight"}
        for s in _WB:
            splits[f"{o}.x_block.attn.qkv.{s}"] = [(f"{d}.attn.to_{n}.{s}", dim) for n in "qkv"]
            splits[f"{o}.context_block.attn.qkv.{s}"] = [(f"{d}.attn.add_{n}_proj.{s}", dim) for n in "qkv"]
    for i in range(config["num_single_layers"]):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        renames |= _linear(f"{o}.adaLN_modulation.1", f"{d}.norm.linear") | _linear(f"{o}.linear2", f"{d}.proj_out")
        renames |= {f"{o}.ln_q.weight": f"{d}.attn.norm_q.weight", f"{o}.ln_k.weight": f"{d}.attn.norm_k.weight"}
        for s in _WB:
            splits[f"{o}.linear1.{s}"] = [(f"{d}.attn.to_{n}.{s}", dim) for n in "qkv"] + [(f"{d}.proj_mlp.{s}", mlp)]
    swapped = {f"final_layer.adaLN_modulation.1.{s}" for s in _WB}
    return renames, splits, swapped


def flux_to_diffusers(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Our Flux state dict -> diffusers' FluxTransformer2DModel state dict."""
    renames, splits, swapped = _diffusers_tables(config)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in splits:
            parts = value.split([rows for _, rows in splits[key]], dim=0)
            out |= {name: part.clone() for (name, _), part in zip(splits[key], parts)}
        elif key in renames:
            out[renames[key]] = swap_halves(value) if key in swapped else value
        else:
            raise CheckpointError(f"Flux parameter {key!r} has no diffusers name (config {config})")
    return out


def flux_from_diffusers(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """diffusers' FluxTransformer2DModel state dict -> ours; every expected key must be there, and no other."""
    renames, splits, swapped = _diffusers_tables(config)
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in state_dict:
            raise CheckpointError(f"diffusers Flux transformer: missing {name!r}")
        used.add(name)
        return state_dict[name]

    out = {ours: torch.cat([take(name) for name, _ in parts], dim=0) for ours, parts in splits.items()}
    for ours, theirs in renames.items():
        out[ours] = swap_halves(take(theirs)) if ours in swapped else take(theirs)
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise CheckpointError(f"diffusers Flux transformer: unexpected keys {unknown[:5]}"
                              f"{' ...' if len(unknown) > 5 else ''} for the config {config}")
    return out


def flux_module_names(config: dict) -> dict[str, tuple[tuple[str, ...], bool, tuple[int, ...]]]:
    """Our Flux module path -> (its diffusers module path(s), output halves swapped, the output rows of each): one
    name for a renamed layer; a double block's fused ``attn.qkv`` is ``to_q`` / ``to_k`` / ``to_v``
    (``add_{q,k,v}_proj``), a single block's ``linear1`` ``to_q`` / ``to_k`` / ``to_v`` / ``proj_mlp`` (rows D, D,
    D, 4 D). What a LoRA file in diffusers' layout names (ldm.formats.lora_peft); the tables of the state-dict maps."""
    renames, splits, swapped = _diffusers_tables(config)
    out = {}
    for ours, theirs in renames.items():
        if ours.endswith(".weight"):
            out[ours[: -len(".weight")]] = ((theirs[: -len(".weight")],), ours in swapped, ())
    for ours, parts in splits.items():
        if ours.endswith(".weight"):
            out[ours[: -len(".weight")]] = (tuple(n[: -len(".weight")] for n, _ in parts), False,
                                            tuple(rows for _, rows in parts))
    return out


def flux_diffusers_config(config: dict) -> dict:
    """diffusers' transformer/config.json values of our Flux config (its model sees 2 x 2-packed tokens:
    in_channels x 4, patch_size 1; out_channels null when it equals in_channels, as the published configs)."""
    if config["patch_size"] != 2:
        raise CheckpointError(f"diffusers' Flux packs 2 x 2 patches; this Flux has patch_size={config['patch_size']}")
    out = {k: config[k] for k in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                                  "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")}
    out |= {"patch_size": 1, "in_channels": 4 * config["in_channels"], "axes_dims_rope": list(config["axes_dims_rope"]),
            "out_channels": None if config["out_channels"] == config["in_channels"] else 4 * config["out_channels"]}
    return out


def flux_config_from_diffusers(cfg: dict) -> dict:
    """Our Flux config from diffusers' transformer/config.json (missing keys: FluxTransformer2DModel's defaults)."""
    if cfg.get("patch_size", 1) != 1:
        raise CheckpointError(f"diffusers Flux transformer config: patch_size {cfg['patch_size']} (FluxPipeline packs "
                              "2 x 2 patches into the channels and needs 1)")
    in_ch = cfg.get("in_channels", 64)
    out_ch = cfg.get("out_channels") or in_ch
    if in_ch % 4 or out_ch % 4:
        raise CheckpointError(f"diffusers Flux transformer config: in_channels {in_ch} / out_channels {out_ch} are "
                              "not 4 x the latent channels")
    return dict(in_channels=in_ch // 4, out_channels=out_ch // 4, patch_size=2, num_layers=cfg.get("num_layers", 19),
                num_single_layers=cfg.get("num_single_layers", 38),
                attention_head_dim=cfg.get("attention_head_dim", 128),
                num_attention_heads=cfg.get("num_attention_heads", 24),
                joint_attention_dim=cfg.get("joint_attention_dim", 4096),
                pooled_projection_dim=cfg.get("pooled_projection_dim", 768),
                guidance_embeds=bool(cfg.get("guidance_embeds", False)),
                axes_dims_rope=tuple(cfg.get("axes_dims_rope", (16, 56, 56))))


def write_flux_transformer(flux: nn.Module, folder, dtype: torch.dtype | None = None) -> Path:
    """A diffusers Flux folder's ``transformer/``, which ``FluxTransformer2DModel.from_pretrained`` loads unchanged."""
    return write_transformer_folder(folder, "FluxTransformer2DModel", flux_diffusers_config(flux.config),
                                    flux_to_diffusers(flux.state_dict(), flux.config), dtype)


def read_flux_transformer(folder, variant: str | None = None) -> nn.Module:
    """Our Flux from a diffusers ``transformer/`` folder (bounded: ``read_transformer_folder``)."""
    return read_transformer_folder(folder, FLUX_TARGET, flux_config_from_diffusers, flux_from_diffusers, variant)
