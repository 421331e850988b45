"""kohya sd-scripts' LoRA single file (what ComfyUI and A1111 load), reader and writer.

Layout (kohya-ss/sd-scripts `networks/lora.py`, `LoRANetwork` / `LoRAModule`):
    lora_unet_<diffusers module path, "." -> "_">.lora_down.weight   (r, in)   or (r, in, k, k)  for a conv
    lora_unet_<...>.lora_up.weight                                    (out, r)  or (out, r, 1, 1)
    lora_unet_<...>.alpha                                             scalar; scale = alpha / r
    lora_te_<transformers CLIPTextModel path, "." -> "_">...          the text encoder
    lora_te1_<...> / lora_te2_<...>                                   SDXL's ViT-L / bigG (sd-scripts
                                                                      sdxl_train_network.py: LORA_PREFIX_TEXT_ENCODER1/2)
kohya's U-Net uses diffusers' module names (`down_blocks_0_attentions_0_...`), so that is what we write. On reading we
also accept the original SD names (`lora_unet_input_blocks_1_1_...`), as ComfyUI's `comfy/lora.py`
`model_lora_keys_unet` maps both: every `diffusion_model.<key>.weight` and every diffusers key of
`utils.unet_to_diffusers`, with "." -> "_".
Metadata: kohya's `ss_*` training keys (train_network.py) and the `modelspec.*` keys of Stability's model spec
(sd-scripts `library/sai_model_spec.py`). Metadata is data: it is read as strings and never executed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from torch import Tensor, nn

from ldm.formats.lora_layers import fit_weights, text_hub_path, unet_diffusers_paths
from ldm.models.lora import LoRANetwork, is_adaptable

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"  # kohya LORA_PREFIX_TEXT_ENCODER (SD1/2 have one text encoder)
TE1_PREFIX, TE2_PREFIX = "lora_te1_", "lora_te2_"  # SDXL's two encoders
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


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
    """kohya's name of a text-encoder layer: lora_te_ (one encoder), lora_te1_ / lora_te2_ (SDXL's
    ``model`` = ViT-L / ``model_2`` = bigG), then the hub CLIPTextModel path with "." -> "_"."""
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
        state[f"{name}.lora_down.weight"] = w["down"].detach().float().cpu().contiguous()
        state[f"{name}.lora_up.weight"] = w["up"].detach().float().cpu().contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(w["alpha"]))
    return state


# sd-scripts' base-model names: library/sdxl_model_util.py MODEL_VERSION_SDXL_BASE_V1_0, library/model_util.py
# get_model_version_str_for_sd1_sd2 ("sd_v1" / "sd_v2", + "_v" for v-prediction); library/sai_model_spec.py
# determine_architecture (ARCH_*) and determine_implementation (an SDXL LoRA: IMPL_STABILITY_AI).
SDXL_BASE_VERSION = "sdxl_base_v1-0"
ARCH_SD_V1, ARCH_SD_V2_512 = "stable-diffusion-v1", "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base"
ARCH_SD3 = "stable-diffusion-3"  # sd-scripts library/sai_model_spec.py ARCH_SD3_M (a variant may follow: "-m", ...)
SD3_VERSION = "sd3"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "https://github.com/huggingface/diffusers"


def infer_base_model_version(roots: dict[str, nn.Module], prediction_type: str = "epsilon") -> str:
    """kohya's ``ss_base_model_version`` of the model the LoRA adapts: SDXL (dual text encoder, or a U-Net with
    SDXL's vector input), SD2 (OpenCLIP's gelu text encoder; without one, a 1024-wide U-Net context), else SD1."""
    te, unet = roots.get("text_encoder"), roots.get("unet")
    unet_config = getattr(unet, "config", None) or {}
    if "joint_attention_dim" in unet_config:  # an MMDiT
        return SD3_VERSION
    if hasattr(te, "model_2") or unet_config.get("adm_in_channels"):
        return SDXL_BASE_VERSION
    text = getattr(te, "model", te)
    if text is not None and hasattr(text, "config"):
        v2 = getattr(text.config, "hidden_act", None) == "gelu"
    else:
        v2 = unet_config.get("context_dim") == 1024
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if prediction_type == "v_prediction" else "")


def model_spec_architecture(version: str) -> str:
    """``modelspec.architecture`` of a LoRA for the base model ``version`` (sai_model_spec.determine_architecture)."""
    if version == SD3_VERSION:
        arch = ARCH_SD3
    elif version.startswith("sdxl"):
        arch = ARCH_SD_XL_V1_BASE
    elif version.startswith("sd_v2"):
        arch = ARCH_SD_V2_768_V if version.endswith("_v") else ARCH_SD_V2_512
    else:
        arch = ARCH_SD_V1
    return f"{arch}/lora"


def kohya_metadata(network: LoRANetwork, roots: dict[str, nn.Module], *, base_model_version: str | None = None,
                   prediction_type: str = "epsilon", resolution: int | None = None, title: str = "ldm LoRA",
                   training: dict[str, Any] | None = None) -> dict[str, str]:
    """kohya's ss_* keys (the ones A1111 / ComfyUI UIs show) and modelspec.* (architecture, e.g.
    `stable-diffusion-xl-v1-base/lora`), all strings. The base model version is read from ``roots`` (and
    ``prediction_type``) unless given. `training` adds further ss_* values (lr, steps, seed, ...)."""
    mods = list(network.loras.values())
    linear = [m for m in mods if not (m.kind == "conv" and m.down.kernel_size != (1, 1))]
    conv = [m for m in mods if m not in linear]
    version = base_model_version or infer_base_model_version(roots, prediction_type)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(linear[0].rank if linear else conv[0].rank),
        "ss_network_alpha": str(float(linear[0].alpha) if linear else float(conv[0].alpha)),
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": model_spec_architecture(version),
        "modelspec.implementation": IMPL_STABILITY_AI if version.startswith("sdxl") else IMPL_DIFFUSERS,
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
    }
    if conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv[0].rank), "conv_alpha": str(float(conv[0].alpha))})
    if resolution:
        meta["ss_resolution"] = f"({resolution}, {resolution})"
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    for k, v in (training or {}).items():
        meta[k if k.startswith("ss_") else f"ss_{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta


# ------------------------------------------------------------------------------------------------------- read

def is_kohya(keys) -> bool:
    return any(k.startswith((UNET_PREFIX, TE_PREFIX, TE1_PREFIX, TE2_PREFIX)) and k.endswith(SUFFIXES) for k in keys)


def from_kohya(state: dict[str, Tensor], roots: dict[str, nn.Module]):
    """-> (weights for LoRANetwork.from_weights, keys that could not be mapped). A key is unmapped when its module
    is not a layer of ours, when it is not a lora_down/lora_up/alpha key (LoHa, LoKr, DoRA, lora_mid, ...), or
    when its down or up half is missing."""
    table = name_table(roots)
    grouped: dict[str, dict[str, Tensor]] = {}
    unmapped = []
    for key, value in state.items():
        for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")):
            if key.endswith(suffix):
                grouped.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            unmapped.append(key)
    weights = {}
    for name, parts in grouped.items():
        target = table.get(name)
        if target is None or "down" not in parts or "up" not in parts:
            unmapped += [name + s for s, p in zip(SUFFIXES, ("down", "up", "alpha")) if p in parts]
            continue
        base = roots[target[0]].get_submodule(target[1])
        weights[target] = fit_weights(parts, base)
    return weights, sorted(unmapped)
