"""The SD3 / SD3.5 transformer as a single file (Stability's release layout, what ComfyUI loads): our MMDiT's own
names under ``model.diffusion_model.`` (ComfyUI ``comfy/ldm/modules/diffusionmodules/mmdit.py``; diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` reads the same keys), read and written, and the MMDiT config
read back from the tensors' shapes (as diffusers' single-file loader infers it)."""

from __future__ import annotations

import math
import re

from torch import Tensor

from ldm.formats.safe_load import CheckpointError

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
