"""OpenCLIP text tower (SD2 ``cond_stage_model.model.*``) <-> transformers CLIP keys.

OpenCLIP stores attention as ``nn.MultiheadAttention`` (one fused
``in_proj_weight`` = [q; k; v]); transformers' ``CLIPTextModel`` has separate
``q_proj/k_proj/v_proj``. Keys here have the ``cond_stage_model.model.``
prefix stripped on the OpenCLIP side and use the hub ``text_model.`` prefix
on the transformers side.
"""

from __future__ import annotations

import re

import torch

from ldm.formats.safe_load import CheckpointError

HF = "text_model."
# OpenCLIP entries without a CLIPTextModel counterpart (not needed for SD).
DROPPED = ("text_projection", "logit_scale", "attn_mask")

_TOP = {
    "token_embedding.weight": HF + "embeddings.token_embedding.weight",
    "positional_embedding": HF + "embeddings.position_embedding.weight",
    "ln_final.weight": HF + "final_layer_norm.weight",
    "ln_final.bias": HF + "final_layer_norm.bias",
}
_BLOCK = {  # inside transformer.resblocks.N -> inside encoder.layers.N
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OC_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OC_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_HF_BLOCK = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def openclip_num_layers(state_dict: dict) -> int:
    """Number of ``transformer.resblocks`` in an OpenCLIP text state dict."""
    ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def openclip_to_hf(state_dict: dict, num_layers: int | None = None) -> dict:
    """OpenCLIP text keys -> transformers ``CLIPTextModel`` hub keys.

    Blocks with index >= ``num_layers`` are dropped (SD2 never uses the 24th
    block: diffusers' SD2 text encoder has 23 layers). ``text_projection``,
    ``logit_scale`` and ``visual.*`` are dropped; other unknown keys are errors.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key in DROPPED or key.startswith("visual."):
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        if m := _OC_IN_PROJ.match(key):
            layer, kind = int(m.group(1)), m.group(2)
            if num_layers is None or layer < num_layers:
                q, k, v = value.chunk(3, dim=0)
                base = f"{HF}encoder.layers.{layer}.self_attn."
                for name, part in zip("qkv", (q, k, v)):
                    out[f"{base}{name}_proj.{kind}"] = part.clone()
            continue
        m = _OC_BLOCK.match(key)
        if m and m.group(2) in _BLOCK:
            layer = int(m.group(1))
            if num_layers is None or layer < num_layers:
                out[f"{HF}encoder.layers.{layer}.{_BLOCK[m.group(2)]}.{m.group(3)}"] = value
            continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"OpenCLIP text encoder: {len(unknown)} unknown keys: {', '.join(unknown[:20])}")
    return out


def hf_to_openclip(state_dict: dict) -> dict:
    """transformers ``CLIPTextModel`` keys (with or without ``text_model.``) -> OpenCLIP text keys."""
    sd = {(k if k.startswith(HF) else HF + k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out, unknown, qkv = {}, [], {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        m = _HF_BLOCK.match(key)
        if m and m.group(2) in block:
            out[f"transformer.resblocks.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            which = m.group(2).split(".")[1][0]  # "q", "k" or "v"
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[which] = value
        else:
            unknown.append(key)
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != set("qkv"):
            raise CheckpointError(f"CLIP text encoder layer {layer}: incomplete q/k/v {kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"], 0)
    if unknown:
        shown = ", ".join(unknown[:20])
        raise CheckpointError(f"CLIP text encoder: {len(unknown)} keys with no OpenCLIP name: {shown}")
    return out
