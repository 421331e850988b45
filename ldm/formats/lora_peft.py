"""diffusers / PEFT LoRA file (`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights(folder)` loads),
reader and writer.

Layout (diffusers `loaders/lora_pipeline.py` + PEFT `tuners/lora`):
    unet.<diffusers module path>.lora_A.weight            (r, in)  or (r, in, k, k)
    unet.<diffusers module path>.lora_B.weight            (out, r) or (out, r, 1, 1)
    text_encoder.<transformers CLIPTextModel path>.lora_A.weight ...
    unet.<diffusers module path>.lora_magnitude_vector.weight   (out,) or (1, out, 1, 1)   DoRA's magnitude
        (PEFT use_dora=True: tuners/lora/dora.py `self.weight`). Written with `.weight`, the key diffusers' own
        kohya-DoRA converter makes (loaders/lora_conversion_utils.py, `dora_scale` -> `lora_magnitude_vector.weight`):
        transformers 5 loads a text encoder's magnitude only under that name; PEFT's checkpoints (no `.weight`)
        are read too.
alpha is not a tensor: diffusers (>= 0.35) stores the PEFT LoraConfig of each component in the safetensors metadata
key `lora_adapter_metadata`, a JSON object with prefixed keys ("unet.r", "unet.lora_alpha", "unet.rank_pattern",
"unet.alpha_pattern", "unet.target_modules", ...). Without it, alpha = r (PEFT's and diffusers' default).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from ldm.formats.diffusers_keys import unet_diffusers_to_ldm
from ldm.formats.safe_load import CheckpointError, json_object
from ldm.formats.lora_layers import HUB_TEXT_PREFIX, fit_weights, text_hub_path, unet_diffusers_paths
from ldm.models.lora import LoRANetwork, adapter_kind, is_adaptable

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers LORA_ADAPTER_METADATA_KEY
COMPONENT = {"unet": "unet", "text_encoder": "text_encoder"}
SUFFIXES = (".lora_A.weight", ".lora_B.weight")
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector.weight", ".lora_magnitude_vector")  # diffusers' / PEFT's DoRA


def _no_mmdit(roots: dict[str, nn.Module]) -> None:
    """diffusers' SD3 LoRAs adapt to_q / to_k / to_v separately where the MMDiT has one fused qkv layer: that
    layout is not mapped here yet (a fused rank-r LoRA splits exactly, the reverse needs rank 3r)."""
    from ldm.models.flux import Flux
    from ldm.models.mmdit import MMDiT

    if isinstance(roots.get("unet"), MMDiT):
        raise ValueError("an MMDiT (SD3) LoRA in the diffusers / PEFT layout is not supported yet: use the kohya "
                         "layout (the original MMDiT names, as sd-scripts' SD3 LoRAs)")
    if isinstance(roots.get("unet"), Flux):  # the same fused qkv (and a single block's fused linear1)
        raise ValueError("a Flux LoRA in the diffusers / PEFT layout is not supported yet: use the kohya layout "
                         "(BFL's module names, as sd-scripts' Flux LoRAs)")


def _peft_paths(roots: dict[str, nn.Module], targets: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    unet_paths = [p for r, p in targets if r == "unet"]
    diff = unet_diffusers_paths(roots["unet"], unet_paths) if unet_paths else {}
    return {(r, p): diff[p] if r == "unet" else text_hub_path(p) for r, p in targets}


# ------------------------------------------------------------------------------------------------------ write

def to_peft(network: LoRANetwork, roots: dict[str, nn.Module]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """-> (state dict, safetensors metadata). Ranks / alphas that differ from the component's most common one go in
    PEFT's rank_pattern / alpha_pattern, keyed by the full module path (an exact match in PEFT)."""
    _no_mmdit(roots)
    weights = network.weights()
    names = _peft_paths(roots, list(weights))
    state, configs = {}, {}
    kinds = {adapter_kind(w) for w in weights.values()}
    if not kinds <= {"lora", "dora"}:
        raise ValueError(f"the diffusers/PEFT LoRA layout holds LoRA and DoRA adapters, not {sorted(kinds)}: write "
                         "LoHa / LoKr in the kohya (LyCORIS) layout")
    for (root, path), w in weights.items():
        name = f"{COMPONENT[root]}.{names[(root, path)]}"
        state[f"{name}.lora_A.weight"] = w["down"].detach().float().cpu().contiguous()
        state[f"{name}.lora_B.weight"] = w["up"].detach().float().cpu().contiguous()
        if "magnitude" in w:
            state[f"{name}.lora_magnitude_vector.weight"] = peft_magnitude(w["magnitude"], w["down"].ndim)
        # module names for PEFT's config: the text encoder's without `text_model.` (transformers >= 5.6 dropped that
        # level; PEFT matches a target by suffix, so this names the layer in both layouts)
        config_name = names[(root, path)].removeprefix(HUB_TEXT_PREFIX)
        configs.setdefault(root, []).append((config_name, int(w["down"].shape[0]), float(w["alpha"])))
    meta = {}
    for root, entries in configs.items():
        ranks = [r for _, r, _ in entries]
        alphas = [a for _, _, a in entries]
        r0, a0 = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
        prefix = COMPONENT[root]
        meta.update({
            f"{prefix}.r": r0,
            f"{prefix}.lora_alpha": a0,
            f"{prefix}.target_modules": sorted(n for n, _, _ in entries),
            f"{prefix}.rank_pattern": {n: r for n, r, _ in entries if r != r0},
            f"{prefix}.alpha_pattern": {n: a for n, _, a in entries if a != a0},
            f"{prefix}.lora_dropout": 0.0,
            f"{prefix}.use_dora": kinds == {"dora"},
            f"{prefix}.lora_bias": False,
        })
    return state, {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}


def peft_magnitude(magnitude: Tensor, ndim: int) -> Tensor:
    """Our (out, 1[, 1, 1]) magnitude as PEFT keeps it: (out,) for a Linear, (1, out, 1, 1) for a conv
    (``_DoraConvNdLayer.get_weight_norm``: the norm over (1, 2, 3) with keepdim, transposed)."""
    if magnitude.shape[0] == 1 and magnitude.numel() > 1:
        raise ValueError("the diffusers/PEFT layout holds DoRA magnitudes per output channel only (this one is per "
                         "input channel: write it in the kohya layout)")
    m = magnitude.detach().float().cpu().reshape(-1)
    return m.contiguous() if ndim == 2 else m.reshape(1, -1, 1, 1).contiguous()


# ------------------------------------------------------------------------------------------------------- read

def is_peft(keys) -> bool:
    return any(k.endswith(SUFFIXES) for k in keys)


def _pattern_value(patterns: dict, name: str):
    """The value of the ``alpha_pattern`` / ``rank_pattern`` key naming module ``name``: the key equals it or a
    dotted suffix of it (``to_q`` names ``...attn1.to_q``), which is what the exact module paths PEFT and we write
    mean. PEFT reads a key as a regex (``get_pattern_key``); a file is data, so here it is matched literally: a
    backtracking pattern in a downloaded file cannot hang the load."""
    if not isinstance(patterns, dict):
        raise ValueError(f"{METADATA_KEY}: alpha_pattern must map module names to numbers, got "
                         f"{type(patterns).__name__}")
    for pattern, value in patterns.items():
        if name == pattern or name.endswith("." + pattern):
            return value
    return None


def _component_config(metadata: dict[str, str] | None, prefix: str) -> dict:
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json_object(raw, source="the safetensors header", key=METADATA_KEY)  # bounded: nesting, numbers
    except CheckpointError as e:
        raise ValueError(str(e)) from e
    return {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}


def from_peft(state: dict[str, Tensor], roots: dict[str, nn.Module], metadata: dict[str, str] | None = None):
    """-> (weights for LoRANetwork.from_weights, keys that could not be mapped). Bare diffusers U-Net names
    (no `unet.` prefix, as `unet.save_attn_procs` / peft's `get_peft_model_state_dict` write) are accepted too."""
    _no_mmdit(roots)
    unet = roots["unet"]
    te = roots.get("text_encoder")
    te_paths = {}
    if te is not None:
        te_paths = {text_hub_path(n): n for n, m in te.named_modules() if n and is_adaptable(m)}
    grouped: dict[tuple[str, str], dict[str, Tensor]] = {}
    origin: dict[tuple[str, str], list[str]] = {}
    unmapped = []
    for key, value in state.items():
        part = "down" if key.endswith(".lora_A.weight") else "up" if key.endswith(".lora_B.weight") else None
        name = key[: -len(".lora_A.weight")] if part else key
        for suffix in MAGNITUDE_SUFFIXES:
            if key.endswith(suffix):  # DoRA: one value per output channel, as (out, 1) (lora_layers.fit_magnitude)
                part, name, value = "magnitude", key[: -len(suffix)], value.reshape(-1, 1)
                break
        if name.endswith(".alpha") and not part:  # kohya-style alphas some converters leave in
            grouped.setdefault(("?", name[: -len(".alpha")]), {})["alpha"] = value
            continue
        if part is None:
            unmapped.append(key)
            continue
        group = (("text_encoder", name[len("text_encoder."):]) if name.startswith("text_encoder.")
                 else ("unet", name.removeprefix("unet.")))
        grouped.setdefault(group, {})[part] = value
        origin.setdefault(group, []).append(key)
    configs = {root: _component_config(metadata, COMPONENT[root]) for root in COMPONENT}
    alphas = {name: parts["alpha"] for (root, name), parts in grouped.items() if root == "?"}
    weights = {}
    used_alphas = set()
    for (root, name), parts in grouped.items():
        if root == "?":
            continue
        target = None
        if root == "unet":
            try:
                ours = unet_diffusers_to_ldm({f"{name}.weight": 0}, unet.config)
                path = next(iter(ours))[: -len(".weight")]
                if is_adaptable(unet.get_submodule(path)):
                    target = ("unet", path)
            except (ValueError, AttributeError):
                target = None
        elif name in te_paths:
            target = ("text_encoder", te_paths[name])
        if target is None or "down" not in parts or "up" not in parts:
            unmapped += origin[(root, name)]
            continue
        cfg = configs[root]
        rank = int(parts["down"].shape[0])
        alpha_key = next((a for a in (name, f"{COMPONENT[root]}.{name}") if a in alphas), None)
        alpha = alphas[alpha_key] if alpha_key else None
        used_alphas.add(alpha_key)
        if alpha is None and cfg:
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name)
            if alpha is None:
                alpha = cfg.get("lora_alpha")
        if alpha is not None and not isinstance(alpha, (int, float, torch.Tensor)):
            raise ValueError(f"{METADATA_KEY}: the alpha of {name} is {alpha!r}, not a number")
        base = roots[target[0]].get_submodule(target[1])
        weights[target] = fit_weights({"down": parts["down"], "up": parts["up"], "magnitude": parts.get("magnitude"),
                                       "alpha": torch.tensor(float(alpha if alpha is not None else rank))}, base)
    unmapped += [f"{a}.alpha" for a in alphas if a not in used_alphas]
    return weights, sorted(unmapped)
