"""kohya sd-scripts' LoRA single file (what ComfyUI and A1111 load), reader and writer.

Layout (kohya-ss/sd-scripts `networks/lora.py`, `LoRANetwork` / `LoRAModule`):
    lora_unet_<diffusers module path, "." -> "_">.lora_down.weight   (r, in)   or (r, in, k, k)  for a conv
    lora_unet_<...>.lora_up.weight                                    (out, r)  or (out, r, 1, 1)
    lora_unet_<...>.alpha                                             scalar; scale = alpha / r
    lora_te_<transformers CLIPTextModel path, "." -> "_">...          the text encoder
    lora_te1_<...> / lora_te2_<...>                                   SDXL's ViT-L / bigG (sd-scripts
                                                                      sdxl_train_network.py: LORA_PREFIX_TEXT_ENCODER1/2)
    lora_unet_joint_blocks_0_x_block_attn_qkv...                      an MMDiT (SD3): the original module names,
    lora_te1_ / lora_te2_ / lora_te3_<T5EncoderModel path>            CLIP-L, CLIP-G, T5 (networks/lora_sd3.py)
The LyCORIS kinds use the same module names with their own tensors (LyCORIS ``modules/loha.py`` / ``lokr.py``
``weight_list``, what ComfyUI ``comfy/weight_adapter/loha.py`` / ``lokr.py`` load):
    <name>.hada_w1_a (out, r)  .hada_w1_b (r, in*k*k)  .hada_w2_a  .hada_w2_b  .alpha           LoHa
    <name>.hada_t1 / .hada_t2 (r, r, k, k) with hada_w*_a (r, out), hada_w*_b (r, in)        LoHa, CP/Tucker conv
    <name>.lokr_w1 (a, c) | .lokr_w1_a + .lokr_w1_b;  .lokr_w2 (b, d[, k, k]) | .lokr_w2_a + .lokr_w2_b;  .alpha  LoKr
    <name>.lokr_t2 (r, r, k, k) with lokr_w2_a (r, b), lokr_w2_b (r, d)                     LoKr, CP/Tucker conv
    <name>.lora_down.weight  .lora_up.weight  .alpha  .dora_scale (out, 1[, 1, 1])              DoRA (LyCORIS
                             dora_wd; ComfyUI reads `.dora_scale` beside any kind: comfy/lora.py load_lora)
kohya's U-Net uses diffusers' module names (`down_blocks_0_attentions_0_...`), so that is what we write. On reading we
also accept the original SD names (`lora_unet_input_blocks_1_1_...`), as ComfyUI's `comfy/lora.py`
`model_lora_keys_unet` maps both: every `diffusion_model.<key>.weight` and every diffusers key of
`utils.unet_to_diffusers`, with "." -> "_".
Metadata: kohya's `ss_*` training keys (train_network.py), the `modelspec.*` keys of Stability's model spec and the
`sshs_*` hashes, as sd-scripts writes them (ldm/formats/model_spec.py). Metadata is data: it is read as strings and
never executed.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from ldm.formats.lora_layers import fit_weights, text_hub_path, unet_diffusers_paths
from ldm.formats.model_spec import (  # noqa: F401 - infer_base_model_version, model_spec_architecture: re-exported
    infer_base_model_version, model_spec, model_spec_architecture, sshs_hashes)
from ldm.models.lora import LoRANetwork, is_adaptable

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"  # kohya LORA_PREFIX_TEXT_ENCODER (SD1/2 have one text encoder)
TE1_PREFIX, TE2_PREFIX = "lora_te1_", "lora_te2_"  # SDXL's two encoders (and SD3's CLIP-L / CLIP-G)
TE3_PREFIX = "lora_te3_"  # SD3's T5 (sd-scripts networks/lora_sd3.py LORA_PREFIX_TEXT_ENCODER_T5)
# file suffix -> the part's name in LoRANetwork.weights() (LyCORIS's own names are kept as they are)
PART_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".dora_scale": "magnitude",
                 **{f".{k}": k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                          "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                          "lokr_t2")}}
SUFFIXES = tuple(PART_SUFFIXES)
FILE_SUFFIX = {part: suffix for suffix, part in PART_SUFFIXES.items()}


def kohya_names(roots: dict[str, nn.Module], targets: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(root, our module path) -> the kohya module name we write (diffusers naming, as sd-scripts trains)."""
    unet_paths = [p for r, p in targets if r == "unet"]
    diff = unet_diffusers_paths(roots["unet"], unet_paths) if unet_paths else {}
    out = {}
    for root, path in targets:
        if root == "unet":
            out[(root, path)] = UNET_PREFIX + diff[path].replace(".", "_")
        else:
            out[(root, path)] = text_name(roots[root], path)
    return out


def text_name(text_encoder: nn.Module, path: str) -> str:
    """kohya's name of a text-encoder layer: lora_te_ (one encoder), lora_te1_ / lora_te2_ (SDXL's and SD3's
    ``model`` = ViT-L / ``model_2`` = bigG), then the hub CLIPTextModel path with "." -> "_"."""
    if path.startswith("t5."):  # SD3's T5: its T5EncoderModel path (sd-scripts lora_sd3.py)
        return TE3_PREFIX + path.removeprefix("t5.").replace(".", "_")
    if not hasattr(text_encoder, "model_2"):
        return TE_PREFIX + text_hub_path(path).replace(".", "_")
    if path.startswith("model_2."):
        return TE2_PREFIX + text_hub_path("model." + path.removeprefix("model_2.")).replace(".", "_")
    return TE1_PREFIX + text_hub_path(path).replace(".", "_")


def name_table(roots: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Every kohya name that can address a layer of ours -> (root, path): for the U-Net both the diffusers-named
    and the original-SD-named form (as ComfyUI's model_lora_keys_unet), for the text encoder the hub form."""
    table: dict[str, tuple[str, str]] = {}
    unet = roots["unet"]
    paths = [n for n, m in unet.named_modules() if n and is_adaptable(m)]
    for ours, diff in unet_diffusers_paths(unet, paths).items():
        table[UNET_PREFIX + diff.replace(".", "_")] = ("unet", ours)
        table[UNET_PREFIX + ours.replace(".", "_")] = ("unet", ours)
    te = roots.get("text_encoder")
    if te is not None:
        for n, m in te.named_modules():
            if n and is_adaptable(m):
                table[text_name(te, n)] = ("text_encoder", n)
    return table


# ------------------------------------------------------------------------------------------------------ write

def to_kohya(network: LoRANetwork, roots: dict[str, nn.Module]) -> dict[str, Tensor]:
    weights = network.weights()
    names = kohya_names(roots, list(weights))
    state = {}
    for target, w in weights.items():
        name = names[target]
        for part, tensor in w.items():
            value = torch.tensor(float(tensor)) if part == "alpha" else tensor.detach().float().cpu().contiguous()
            state[f"{name}{FILE_SUFFIX[part]}"] = value
    return state


def kohya_metadata(network: LoRANetwork, roots: dict[str, nn.Module], *, base_model_version: str | None = None,
                   prediction_type: str = "epsilon", resolution: int | None = None, title: str = "ldm LoRA",
                   training: dict[str, Any] | None = None) -> dict[str, str]:
    """kohya's ss_* keys (the ones A1111 / ComfyUI UIs show) and modelspec.* (architecture, e.g.
    `stable-diffusion-xl-v1-base/lora`), all strings. The base model version is read from ``roots`` (and
    ``prediction_type``) unless given. `training` adds further ss_* values (lr, steps, seed, ...)."""
    mods = list(network.loras.values())
    linear = [m for m in mods if not m.spatial]
    conv = [m for m in mods if m not in linear]
    version = base_model_version or infer_base_model_version(roots, prediction_type)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(linear[0].rank if linear else conv[0].rank),
        "ss_network_alpha": str(float(linear[0].alpha) if linear else float(conv[0].alpha)),
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        **model_spec(version, "lora", title=title, prediction_type=prediction_type, resolution=resolution),
    }
    if conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv[0].rank), "conv_alpha": str(float(conv[0].alpha))})
    if resolution:
        meta["ss_resolution"] = f"({resolution}, {resolution})"
    for k, v in (training or {}).items():
        meta[k if k.startswith("ss_") else f"ss_{k}"] = v if isinstance(v, str) else json.dumps(v)
    meta.update(lycoris_metadata(mods, meta.get("ss_network_args")))
    return meta


def lycoris_metadata(modules: list, network_args: str | None) -> dict[str, str]:
    """LoHa / LoKr / DoRA files name LyCORIS's network (``ss_network_module = lycoris.kohya``) and its ``algo``
    (+ ``dora_wd``) in ss_network_args, as the LyCORIS kohya plug-in writes them; plain LoRA files keep kohya's."""
    algos = {m.algo for m in modules}
    if algos == {"lora"}:
        return {}
    (algo,) = algos if len(algos) == 1 else (sorted(algos)[0],)
    args = {**json.loads(network_args or "{}"), "algo": algo.removesuffix("+dora").replace("dora", "lora")}
    if algo.endswith("dora"):
        args["dora_wd"] = "True"
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


# ------------------------------------------------------------------------------------------------------- read

def is_kohya(keys) -> bool:
    return any(k.startswith((UNET_PREFIX, TE_PREFIX, TE1_PREFIX, TE2_PREFIX, TE3_PREFIX)) and k.endswith(SUFFIXES) for k in keys)


def complete(parts: dict) -> bool:
    """A module's parts make one whole adapter: LoRA down + up, LoHa's four hada_w*, LoKr's two factors (each whole
    or as _a + _b halves); a magnitude (DoRA) goes with any of them."""
    kinds = [{"down", "up"}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}]
    w1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts)
    w2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)
    found = [k for k in kinds if k <= set(parts)] + ([{"lokr"}] if w1 and w2 else [])
    tucker_halves = ("hada_t1" in parts) == ("hada_t2" in parts)  # a CP/Tucker LoHa has both cores
    return len(found) == 1 and tucker_halves


def from_kohya(state: dict[str, Tensor], roots: dict[str, nn.Module]):
    """-> (weights for LoRANetwork.from_weights, keys that could not be mapped). A key is unmapped when its module
    is not a layer of ours, when it is none of the tensors LoRA / LoHa / LoKr / DoRA files hold (LoCon's CP/Tucker
    lora_mid, GLoRA, OFT, ...), or when its module's adapter is incomplete."""
    table = name_table(roots)
    grouped: dict[str, dict[str, Tensor]] = {}
    origin: dict[str, list[str]] = {}
    unmapped = []
    for key, value in state.items():
        for suffix, part in PART_SUFFIXES.items():
            if key.endswith(suffix):
                grouped.setdefault(key[: -len(suffix)], {})[part] = value
                origin.setdefault(key[: -len(suffix)], []).append(key)
                break
        else:
            unmapped.append(key)
    unsupported = {k.split(".", 1)[0] for k in unmapped}  # a module with a tensor we do not read: not applied
    weights = {}
    for name, parts in grouped.items():
        target = table.get(name)
        if target is None or name in unsupported or not complete(parts):
            unmapped += origin[name]
            continue
        base = roots[target[0]].get_submodule(target[1])
        weights[target] = fit_weights(parts, base) if "down" in parts else dict(parts)
    return weights, sorted(unmapped)
