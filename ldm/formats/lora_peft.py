"""diffusers / PEFT LoRA file (`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights(folder)` loads),
reader and writer.

Layout (diffusers `loaders/lora_pipeline.py` + PEFT `tuners/lora`):
    unet.<diffusers module path>.lora_A.weight            (r, in)  or (r, in, k, k)
    unet.<diffusers module path>.lora_B.weight            (out, r) or (out, r, 1, 1)
    text_encoder.<transformers CLIPTextModel path>.lora_A.weight ...
    text_encoder_2.<...>                                   SDXL's / SD3's second CLIP (bigG)
    transformer.<diffusers SD3Transformer2DModel path>.lora_A.weight ...   an MMDiT (SD3LoraLoaderMixin: the
        components transformer, text_encoder, text_encoder_2; no T5). Our fused ``attn.qkv`` is diffusers'
        ``to_q`` / ``to_k`` / ``to_v`` (``add_{q,k,v}_proj``): a fused LoRA (A, B) is written exactly as three with
        the same A and B's row blocks; three read back are one LoRA again (the same A: rank r; else rank
        r_q + r_k + r_v, down = [A_q; A_k; A_v], up block-diagonal with each part's alpha/r folded in, alpha = rank).
        The adaLN layers whose (shift, scale) halves diffusers stores swapped (ldm.formats.sd3_diffusers_keys) get
        B's halves swapped.
    transformer.<diffusers FluxTransformer2DModel path>.lora_A.weight ...   a Flux (FluxLoraLoaderMixin: transformer,
        text_encoder (CLIP-L); no T5), the same way: a double block's fused qkv is to_q / to_k / to_v
        (add_{q,k,v}_proj), a single block's linear1 to_q / to_k / to_v / proj_mlp (rows D, D, D, 4 D:
        ldm.formats.flux_keys.flux_module_names), norm_out's halves swapped.
    unet.<diffusers module path>.lora_magnitude_vector.weight   (out,) or (1, out, 1, 1)   DoRA's magnitude
        (PEFT use_dora=True: tuners/lora/dora.py `self.weight`). Written with `.weight`, the key diffusers' own
        kohya-DoRA converter makes (loaders/lora_conversion_utils.py, `dora_scale` -> `lora_magnitude_vector.weight`):
        transformers 5 loads a text encoder's magnitude only under that name; PEFT's checkpoints (no `.weight`)
        are read too.
alpha is not a tensor: diffusers (>= 0.35) stores the PEFT LoraConfig of each component in the safetensors metadata
key `lora_adapter_metadata`, a JSON object with prefixed keys ("unet.r", "unet.lora_alpha", "unet.rank_pattern",
"unet.alpha_pattern", "unet.target_modules", ...; "transformer.r", ... for an MMDiT). Without it, alpha = r (PEFT's
and diffusers' default). Every key is matched literally; a pattern never runs as a regex.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from ldm.formats.diffusers_keys import unet_diffusers_to_ldm
from ldm.formats.safe_load import CheckpointError, json_object
from ldm.formats.lora_layers import HUB_TEXT_PREFIX, fit_weights, text_hub_path, unet_diffusers_paths
from ldm.formats.sd3_diffusers_keys import mmdit_module_names, swap_halves
from ldm.models.lora import LoRANetwork, adapter_kind, is_adaptable

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # the key prefixes diffusers' loaders read
SUFFIXES = (".lora_A.weight", ".lora_B.weight")
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector.weight", ".lora_magnitude_vector")  # diffusers' / PEFT's DoRA


def _transformer_table(unet: nn.Module) -> dict[str, tuple[tuple[str, ...], bool, tuple[int, ...]]] | None:
    """A transformer's module path -> (diffusers' module path(s), output halves swapped, each part's output rows;
    () = equal parts): an MMDiT's (SD3Transformer2DModel) or a Flux's (FluxTransformer2DModel); None for a U-Net."""
    from ldm.formats.flux_keys import flux_module_names
    from ldm.models.flux import Flux
    from ldm.models.mmdit import MMDiT

    if isinstance(unet, MMDiT):
        return {ours: (names, swapped, ()) for ours, (names, swapped) in mmdit_module_names(unet.config).items()}
    if isinstance(unet, Flux):
        return flux_module_names(unet.config)
    return None


def denoiser_component(unet: nn.Module) -> str:
    """The denoiser's component name in diffusers' pipelines: `transformer` (SD3, FLUX.1) or `unet`."""
    return "unet" if _transformer_table(unet) is None else "transformer"


def _row_parts(tensor: Tensor, count: int, rows: tuple[int, ...]) -> tuple[Tensor, ...]:
    """A fused layer's output rows as its diffusers parts: ``rows`` each, or ``count`` equal blocks."""
    return tensor.split(list(rows), dim=0) if rows else tensor.chunk(count, dim=0)


def text_component(path: str) -> tuple[str, str]:
    """A module path inside our text encoder -> (diffusers component, transformers path): `model.` is
    `text_encoder` (CLIP-L), `model_2.` `text_encoder_2` (SDXL's / SD3's bigG). The T5 has no LoRA component in
    diffusers (SD3LoraLoaderMixin loads transformer, text_encoder, text_encoder_2; FluxLoraLoaderMixin transformer,
    text_encoder)."""
    if path.startswith("t5."):
        raise ValueError(f"{path}: diffusers' SD3 / FLUX.1 LoRA layouts have no T5 component; write a LoRA on the "
                         "T5 in the kohya layout")
    if path.startswith("model_2."):
        return "text_encoder_2", text_hub_path("model." + path.removeprefix("model_2."))
    return "text_encoder", text_hub_path(path)


def _peft_names(roots: dict[str, nn.Module], targets: list[tuple[str, str]]
                ) -> dict[tuple[str, str], tuple[str, tuple[str, ...], bool, tuple[int, ...]]]:
    """(root, our module path) -> (component, its diffusers module path(s), output halves swapped, part rows)."""
    unet = roots["unet"]
    unet_paths = [p for r, p in targets if r == "unet"]
    out = {}
    table = _transformer_table(unet)
    if table is not None:
        for p in unet_paths:
            if p not in table:
                raise ValueError(f"the {type(unet).__name__} layer {p} has no name in diffusers' transformer")
            out[("unet", p)] = ("transformer", *table[p])
    elif unet_paths:
        out.update({("unet", ours): ("unet", (theirs,), False, ())
                    for ours, theirs in unet_diffusers_paths(unet, unet_paths).items()})
    for root, path in targets:
        if root != "unet":
            component, name = text_component(path)
            out[(root, path)] = (component, (name,), False, ())
    return out


# ------------------------------------------------------------------------------------------------------ write

def to_peft(network: LoRANetwork, roots: dict[str, nn.Module]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """-> (state dict, safetensors metadata). Ranks / alphas that differ from the component's most common one go in
    PEFT's rank_pattern / alpha_pattern, keyed by the full module path (an exact match in PEFT)."""
    weights = network.weights()
    names = _peft_names(roots, list(weights))
    state, configs = {}, {}
    kinds = {adapter_kind(w) for w in weights.values()}
    if not kinds <= {"lora", "dora"}:
        raise ValueError(f"the diffusers/PEFT LoRA layout holds LoRA and DoRA adapters, not {sorted(kinds)}: write "
                         "LoHa / LoKr in the kohya (LyCORIS) layout")
    for target, w in weights.items():
        component, parts, swapped, rows = names[target]
        down = w["down"].detach().float().cpu().contiguous()
        up = w["up"].detach().float().cpu()
        magnitude = w.get("magnitude")
        if magnitude is not None and magnitude.shape[0] == 1 and magnitude.numel() > 1:
            raise ValueError("the diffusers/PEFT layout holds DoRA magnitudes per output channel only (this one is "
                             "per input channel: write it in the kohya layout)")
        if swapped:  # diffusers' (scale, shift) order of this adaLN's outputs: the up rows follow
            up = swap_halves(up)
            magnitude = None if magnitude is None else swap_halves(magnitude)
        # a fused qkv (a Flux single block's linear1: + proj_mlp): diffusers' to_q / to_k / to_v are its row blocks,
        # each with the same A (exactly the same delta)
        ups = _row_parts(up, len(parts), rows)
        mags = [None] * len(parts) if magnitude is None else _row_parts(magnitude, len(parts), rows)
        for name, part_up, part_mag in zip(parts, ups, mags):
            key = f"{component}.{name}"
            state[f"{key}.lora_A.weight"] = down.clone() if len(parts) > 1 else down
            state[f"{key}.lora_B.weight"] = part_up.contiguous()
            if part_mag is not None:
                state[f"{key}.lora_magnitude_vector.weight"] = peft_magnitude(part_mag, down.ndim)
            # module names for PEFT's config: the text encoder's without `text_model.` (transformers >= 5.6 dropped
            # that level; PEFT matches a target by suffix, so this names the layer in both layouts)
            configs.setdefault(component, []).append((name.removeprefix(HUB_TEXT_PREFIX), int(down.shape[0]),
                                                      float(w["alpha"])))
    meta = {}
    for component, entries in configs.items():
        ranks = [r for _, r, _ in entries]
        alphas = [a for _, _, a in entries]
        r0, a0 = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
        meta.update({
            f"{component}.r": r0,
            f"{component}.lora_alpha": a0,
            f"{component}.target_modules": sorted(n for n, _, _ in entries),
            f"{component}.rank_pattern": {n: r for n, r, _ in entries if r != r0},
            f"{component}.alpha_pattern": {n: a for n, _, a in entries if a != a0},
            f"{component}.lora_dropout": 0.0,
            f"{component}.use_dora": kinds == {"dora"},
            f"{component}.lora_bias": False,
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


PEFT_MODEL_PREFIX = "base_model.model."  # a PeftModel's own state dict (ComfyUI reads it for SD3 too)


def _split_key(key: str, bare: str) -> tuple[str, str]:
    """A file key's module name -> (component, path inside it); a name without a component prefix is the
    denoiser's (``unet.save_attn_procs`` / peft's ``get_peft_model_state_dict`` write bare names, a PeftModel
    ``base_model.model.<name>``)."""
    if key.startswith(PEFT_MODEL_PREFIX):
        return bare, key.removeprefix(PEFT_MODEL_PREFIX)
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS and rest else (bare, key)


def _targets(roots: dict[str, nn.Module]):
    """-> (lookup(component, name) -> (root, our path, slot, slots, swapped) | None): the layer of ours a file's
    module name addresses; slot / slots place a diffusers q / k / v projection in our fused qkv (slots: how many
    equal parts, or each part's rows: a Flux single block's linear1)."""
    unet = roots["unet"]
    te = roots.get("text_encoder")
    text = {}
    if te is not None:
        for n, m in te.named_modules():
            if n and is_adaptable(m) and not n.startswith("t5."):
                text[text_component(n)] = ("text_encoder", n, 0, 1, False)
    transformer = {}
    table = _transformer_table(unet)
    for ours, (names, swapped, rows) in (table or {}).items():
        if is_adaptable(unet.get_submodule(ours)):
            transformer.update({name: ("unet", ours, i, rows or len(names), swapped) for i, name in enumerate(names)})

    def lookup(component: str, name: str):
        if component == "transformer":
            return transformer.get(name)
        if component == "unet" and table is None:
            try:
                ours = unet_diffusers_to_ldm({f"{name}.weight": 0}, unet.config)
                path = next(iter(ours))[: -len(".weight")]
                return ("unet", path, 0, 1, False) if is_adaptable(unet.get_submodule(path)) else None
            except (ValueError, AttributeError):
                return None
        return text.get((component, name))

    return lookup


def _fused(slots: dict[int, dict], parts_of: int | tuple[int, ...], base: nn.Module, name: str) -> dict[str, Tensor]:
    """diffusers' to_q / to_k / to_v (/ proj_mlp) LoRAs (those present) as one LoRA on our fused layer. Each part
    must fit its rows of the layer (``parts_of``: how many equal parts, or each part's rows); the same A and alpha in
    all is a rank-r LoRA (what we write), anything else the block form: down = [A_q; A_k; A_v], up = diag(B_q s_q,
    B_k s_k, B_v s_v) with s = alpha / r, alpha = rank."""
    sizes = list(parts_of) if isinstance(parts_of, tuple) else [base.weight.shape[0] // parts_of] * parts_of
    count, cols = len(sizes), base.weight.shape[1]
    if sum(sizes) != base.weight.shape[0]:
        raise ValueError(f"LoRA weights for {name}: its parts' rows {sizes} are not the layer's {base.weight.shape[0]}")
    starts = [sum(sizes[:i]) for i in range(count)]
    for i, part in slots.items():
        if part["down"].ndim != 2 or part["down"].shape[1] != cols or part["up"].shape != (sizes[i],
                                                                                        part["down"].shape[0]):
            raise ValueError(f"LoRA weights for {name} (part {i + 1} of {count}): down {tuple(part['down'].shape)} / "
                             f"up {tuple(part['up'].shape)} do not fit the layer's ({sizes[i]}, {cols}) block")
    with_magnitude = [i for i, p in slots.items() if p.get("magnitude") is not None]
    if with_magnitude and len(with_magnitude) != count:
        raise ValueError(f"DoRA weights for {name}: a magnitude for {len(with_magnitude)} of its {count} q / k / v "
                         "parts; the fused layer needs all or none")
    parts = [slots[i] for i in sorted(slots)]
    first = parts[0]
    if len(slots) == count and all(torch.equal(p["down"], first["down"]) and p["alpha"] == first["alpha"]
                                   for p in parts):
        fused = {"down": first["down"], "up": torch.cat([p["up"] for p in parts]), "alpha": first["alpha"]}
    else:
        rank = sum(int(p["down"].shape[0]) for p in parts)
        up = first["up"].new_zeros(sum(sizes), rank)
        col = 0
        for i in sorted(slots):
            p = slots[i]
            r = int(p["down"].shape[0])
            scale = (p["alpha"] if p["alpha"] is not None else r) / r
            up[starts[i]:starts[i] + sizes[i], col:col + r] = p["up"] * scale
            col += r
        fused = {"down": torch.cat([p["down"] for p in parts]), "up": up, "alpha": float(rank)}
    if with_magnitude:
        fused["magnitude"] = torch.cat([p["magnitude"] for p in parts])
    return fused


def from_peft(state: dict[str, Tensor], roots: dict[str, nn.Module], metadata: dict[str, str] | None = None):
    """-> (weights for LoRANetwork.from_weights, keys that could not be mapped). Bare diffusers denoiser names
    (no `unet.` / `transformer.` prefix, as `unet.save_attn_procs` / peft's `get_peft_model_state_dict` write) are
    accepted too."""
    bare = denoiser_component(roots["unet"])
    lookup = _targets(roots)
    grouped: dict[tuple[str, str], dict[str, Tensor]] = {}
    origin: dict[tuple[str, str], list[str]] = {}
    alphas: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        part = "down" if key.endswith(".lora_A.weight") else "up" if key.endswith(".lora_B.weight") else None
        name = key[: -len(".lora_A.weight")] if part else key
        for suffix in MAGNITUDE_SUFFIXES:
            if key.endswith(suffix):  # DoRA: one value per output channel, as (out, 1) (lora_layers.fit_magnitude)
                part, name, value = "magnitude", key[: -len(suffix)], value.reshape(-1, 1)
                break
        if name.endswith(".alpha") and not part:  # kohya-style alphas some converters leave in
            alphas[name[: -len(".alpha")]] = value
            continue
        if part is None:
            unmapped.append(key)
            continue
        group = _split_key(name, bare)
        grouped.setdefault(group, {})[part] = value
        origin.setdefault(group, []).append(key)
    configs: dict[str, dict] = {}
    used_alphas = set()
    weights = {}
    split: dict[tuple[str, str], tuple[int, dict[int, dict]]] = {}  # our fused qkv <- diffusers' q / k / v
    for (component, name), parts in grouped.items():
        target = lookup(component, name)
        if target is None or "down" not in parts or "up" not in parts:
            unmapped += origin[(component, name)]
            continue
        root, path, slot, slots, swapped = target
        if component not in configs:
            configs[component] = _component_config(metadata, component)
        cfg = configs[component]
        rank = int(parts["down"].shape[0])
        alpha_key = next((a for a in (name, f"{component}.{name}") if a in alphas), None)
        alpha = alphas[alpha_key] if alpha_key else None
        used_alphas.add(alpha_key)
        if alpha is None and cfg:
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name)
            if alpha is None:
                alpha = cfg.get("lora_alpha")
        if alpha is not None and not isinstance(alpha, (int, float, torch.Tensor)):
            raise ValueError(f"{METADATA_KEY}: the alpha of {name} is {alpha!r}, not a number")
        base = roots[root].get_submodule(path)
        fitted = fit_weights({"down": parts["down"], "up": parts["up"], "magnitude": parts.get("magnitude"),
                              "alpha": torch.tensor(float(alpha if alpha is not None else rank))}, base)
        if swapped:  # diffusers' (scale, shift) order of this adaLN's outputs -> ours (shift, scale)
            fitted["up"] = swap_halves(fitted["up"])
            if fitted.get("magnitude") is not None:
                fitted["magnitude"] = swap_halves(fitted["magnitude"])
        if slots == 1:
            weights[(root, path)] = fitted
        else:
            split.setdefault((root, path), (slots, {}))[1][slot] = fitted
    for (root, path), (slots, parts) in split.items():
        weights[(root, path)] = _fused(parts, slots, roots[root].get_submodule(path), f"{root}.{path}")
    unmapped += [f"{a}.alpha" for a in alphas if a not in used_alphas]
    return weights, sorted(unmapped)
