"""Key and config maps between our (original CompVis) layout and diffusers'.

Our UNet / VAE parameter names equal the original Stable Diffusion single
file (prefixes stripped). diffusers renames blocks; the maps here are built
from the model config as tables of module prefixes, so each direction is the
exact inverse of the other.
"""

from __future__ import annotations

from ldm.formats.safe_load import CheckpointError
from ldm.models.sdxl_conditioning import SIZE_EMBED_DIM  # diffusers' addition_time_embed_dim of SDXL

# Renames inside a UNet ResBlock: ours -> diffusers.
UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# Renames inside a VAE ResnetBlock / mid AttnBlock: ours -> diffusers.
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# --------------------------------------------------------------------------- #
# prefix tables
# --------------------------------------------------------------------------- #


def _unet_table(config: dict) -> list[tuple[str, str, dict]]:
    """``(ours, diffusers, inner renames)`` module prefixes of a UNet config."""
    levels = len(config["channel_mult"])
    nrb = config["num_res_blocks"]
    attn = set(config["attention_levels"])
    t = [
        ("time_embed.0", "time_embedding.linear_1", {}),
        ("time_embed.2", "time_embedding.linear_2", {}),
        ("input_blocks.0.0", "conv_in", {}),
        ("out.0", "conv_norm_out", {}),
        ("out.2", "conv_out", {}),
        ("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
        ("middle_block.1", "mid_block.attentions.0", {}),
        ("middle_block.2", "mid_block.resnets.1", UNET_RESNET),
    ]
    if config.get("adm_in_channels"):  # SDXL's vector conditioning (diffusers addition_embed_type="text_time")
        t += [("label_emb.0.0", "add_embedding.linear_1", {}), ("label_emb.0.2", "add_embedding.linear_2", {})]
    for level in range(levels):
        for j in range(nrb):
            i = 1 + level * (nrb + 1) + j
            t.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESNET))
            if level in attn:
                t.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", {}))
        if level != levels - 1:
            i = 1 + level * (nrb + 1) + nrb
            t.append((f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", {}))
    for b in range(levels):  # diffusers up block b runs at level (levels - 1 - b)
        level = levels - 1 - b
        for j in range(nrb + 1):
            i = b * (nrb + 1) + j
            t.append((f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", UNET_RESNET))
            if level in attn:
                t.append((f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}", {}))
            if j == nrb and level > 0:
                k = 2 if level in attn else 1
                t.append((f"output_blocks.{i}.{k}.conv", f"up_blocks.{b}.upsamplers.0.conv", {}))
    return t


def _vae_table(config: dict) -> list[tuple[str, str, dict]]:
    """``(ours, diffusers, inner renames)`` module prefixes of a VAE config."""
    levels = len(config["channel_mult"])
    nrb = config["num_res_blocks"]
    t = [(n, n, {}) for n, on in (("quant_conv", config.get("use_quant_conv", True)),
                                  ("post_quant_conv", config.get("use_post_quant_conv", True))) if on]
    for part in ("encoder", "decoder"):
        t += [
            (f"{part}.conv_in", f"{part}.conv_in", {}),
            (f"{part}.norm_out", f"{part}.conv_norm_out", {}),
            (f"{part}.conv_out", f"{part}.conv_out", {}),
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
            (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET),
        ]
    for level in range(levels):
        for j in range(nrb):
            t.append((f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", VAE_RESNET))
        if level != levels - 1:
            t.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv", {}))
        b = levels - 1 - level  # decoder.up[level] is diffusers up_blocks[levels-1-level]
        for j in range(nrb + 1):
            t.append((f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}", VAE_RESNET))
        if level != 0:
            t.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv", {}))
    return t


def _rename(state_dict: dict, table, forward: bool, what: str) -> dict:
    """Rename keys by the longest matching module prefix; unknown keys are an error."""
    pairs = [(a, b, r) if forward else (b, a, {v: k for k, v in r.items()}) for a, b, r in table]
    pairs.sort(key=lambda p: -len(p[0]))
    out, unknown = {}, []
    for key, value in state_dict.items():
        for src, dst, inner in pairs:
            if key.startswith(src + "."):
                rest = key[len(src) + 1:]
                for old, new in inner.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                out[f"{dst}.{rest}"] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise CheckpointError(f"{what}: {len(unknown)} keys do not fit the model config: {shown}")
    return out


def unet_ldm_to_diffusers(state_dict: dict, unet_config: dict) -> dict:
    """Our / original UNet keys -> diffusers ``UNet2DConditionModel`` keys."""
    return _rename(state_dict, _unet_table(unet_config), True, "UNet (ldm -> diffusers)")


def unet_diffusers_to_ldm(state_dict: dict, unet_config: dict) -> dict:
    """diffusers ``UNet2DConditionModel`` keys -> our / original UNet keys."""
    return _rename(state_dict, _unet_table(unet_config), False, "UNet (diffusers -> ldm)")


def _is_vae_attention_weight(key: str) -> bool:
    return ".mid.attn_1." in key and key.endswith(".weight") and not key.endswith("norm.weight")


def vae_ldm_to_diffusers(state_dict: dict, vae_config: dict) -> dict:
    """Our VAE keys -> diffusers ``AutoencoderKL`` keys (mid-attention 1x1 convs -> Linear)."""
    flat = {
        k: (v[:, :, 0, 0] if _is_vae_attention_weight(k) and v.ndim == 4 else v)
        for k, v in state_dict.items()
    }
    return _rename(flat, _vae_table(vae_config), True, "VAE (ldm -> diffusers)")


def vae_diffusers_to_ldm(state_dict: dict, vae_config: dict) -> dict:
    """diffusers ``AutoencoderKL`` keys -> our VAE keys (Linear -> 1x1 conv weights)."""
    out = _rename(state_dict, _vae_table(vae_config), False, "VAE (diffusers -> ldm)")
    return {
        k: (v[:, :, None, None] if _is_vae_attention_weight(k) and v.ndim == 2 else v)
        for k, v in out.items()
    }


# --------------------------------------------------------------------------- #
# configs
# --------------------------------------------------------------------------- #

# diffusers settings our UNet implements (anything else is refused).
_UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
    "encoder_hid_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "time_cond_proj_dim": None,
    "attention_type": "default", "class_embeddings_concat": False, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_dim": None, "timestep_post_act": None,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}




def _adm_in_channels(cfg: dict) -> int | None:
    """The U-Net's vector-conditioning size from a diffusers config (None without addition embedding)."""
    kind = cfg.get("addition_embed_type")
    if kind is None:
        return None
    if kind != "text_time":
        raise ValueError(f"unsupported diffusers UNet setting addition_embed_type={kind!r} (need None or 'text_time')")
    if cfg.get("addition_time_embed_dim") != SIZE_EMBED_DIM:
        raise ValueError(f"unsupported diffusers UNet setting addition_embed_type='text_time' with "
                         f"addition_time_embed_dim={cfg.get('addition_time_embed_dim')!r} (need {SIZE_EMBED_DIM}, SDXL's)")
    adm = cfg.get("projection_class_embeddings_input_dim")
    if not isinstance(adm, int) or adm <= 0:
        raise ValueError(f"addition_embed_type='text_time' needs projection_class_embeddings_input_dim, got {adm!r}")
    return adm


def _head_channels(config: dict) -> int:
    """Fixed head width (SD2: 64), or -1 when the head count is fixed (SD1)."""
    return config.get("num_head_channels") or -1


def unet_diffusers_config(unet_config: dict, sample_size: int | None = None) -> dict:
    """Our UNet kwargs -> diffusers ``UNet2DConditionModel`` config (config.json)."""
    c = unet_config
    levels = len(c["channel_mult"])
    attn = set(c["attention_levels"])
    if _head_channels(c) > 0:  # SD2: head counts per level (= channels / 64)
        head_dim = [max(1, c["model_channels"] * m // _head_channels(c)) for m in c["channel_mult"]]
    else:
        head_dim = c["num_heads"]  # SD1: diffusers' "attention_head_dim" is the head count
    depth = c.get("transformer_depth", 1)
    if isinstance(depth, (list, tuple)):  # diffusers builds no transformer at a DownBlock2D level: 0 -> 1
        depth = [max(int(d), 1) for d in depth]
    adm = c.get("adm_in_channels")
    addition = ({"addition_embed_type": "text_time", "addition_time_embed_dim": SIZE_EMBED_DIM,
                 "projection_class_embeddings_input_dim": adm} if adm else {"addition_embed_type": None})
    return {
        "_class_name": "UNet2DConditionModel",
        **addition,
        **{k: v for k, v in _UNET_FIXED.items() if v is not None},
        "sample_size": sample_size,
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "block_out_channels": [c["model_channels"] * m for m in c["channel_mult"]],
        "layers_per_block": c["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels)],
        "up_block_types": [
            "CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(levels))
        ],
        "attention_head_dim": head_dim,
        "cross_attention_dim": c["context_dim"],
        "transformer_layers_per_block": list(depth) if isinstance(depth, (list, tuple)) else depth,
        "use_linear_projection": bool(c.get("use_linear_projection", False)),
        "upcast_attention": False,
        "dropout": c.get("dropout", 0.0),
    }


def unet_config_from_diffusers(cfg: dict) -> dict:
    """diffusers ``UNet2DConditionModel`` config -> our UNet kwargs."""
    for key, want in _UNET_FIXED.items():
        have = cfg.get(key, want)
        if isinstance(have, (list, tuple)) and key == "only_cross_attention":
            have = any(have)
        if have != want:
            raise ValueError(f"unsupported diffusers UNet setting {key}={have!r} (need {want!r})")
    blocks = list(cfg["block_out_channels"])
    base = blocks[0]
    if any(b % base for b in blocks):
        raise ValueError(f"block_out_channels {blocks} are not multiples of {base}")
    down = list(cfg["down_block_types"])
    attention_levels = [i for i, t in enumerate(down) if t.startswith("CrossAttn")]
    expected_up = ["CrossAttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(len(down)))]
    if list(cfg.get("up_block_types", expected_up)) != expected_up:
        raise ValueError(f"up_block_types {cfg['up_block_types']} do not mirror down_block_types {down}")
    if not isinstance(cfg.get("layers_per_block", 2), int):
        raise ValueError("per-level layers_per_block is not supported")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        heads = list(heads)
        if len(set(heads)) == 1:
            num_heads, head_channels = heads[0], -1
        else:
            # only levels with attention have heads (SDXL's first level: a head count diffusers never uses)
            pairs = [(blocks[i], heads[i]) for i in attention_levels] or list(zip(blocks, heads))
            widths = {b // h for b, h in pairs if h > 0}
            if len(widths) != 1 or any(h <= 0 or b % h for b, h in pairs):
                raise ValueError(f"head counts {heads} give no common head width for {blocks}")
            num_heads, head_channels = -1, widths.pop()
    else:
        num_heads, head_channels = int(heads), -1
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):  # no transformer at a level without attention (SGM writes 0 there)
        depth = [int(d) if i in attention_levels else 0 for i, d in enumerate(depth)]
    adm = _adm_in_channels(cfg)
    return {
        **({"adm_in_channels": adm} if adm else {}),
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "model_channels": base,
        "channel_mult": [b // base for b in blocks],
        "num_res_blocks": cfg.get("layers_per_block", 2),
        "attention_levels": attention_levels,
        "num_heads": num_heads,
        "num_head_channels": head_channels,
        "transformer_depth": list(depth) if isinstance(depth, (list, tuple)) else depth,
        "context_dim": cfg.get("cross_attention_dim", 1280),
        "use_linear_projection": bool(cfg.get("use_linear_projection", False)),
        "dropout": cfg.get("dropout", 0.0),
    }


def vae_diffusers_config(vae_config: dict, sample_size: int | None = None) -> dict:
    """Our VAE kwargs -> diffusers ``AutoencoderKL`` config (config.json)."""
    c = vae_config
    levels = len(c["channel_mult"])
    out = {
        "_class_name": "AutoencoderKL",
        "in_channels": c.get("in_channels", 3),
        "out_channels": c.get("out_channels", 3),
        "latent_channels": c.get("latent_channels", 4),
        "block_out_channels": [c["base_channels"] * m for m in c["channel_mult"]],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": c["num_res_blocks"],
        "act_fn": "silu",
        "norm_num_groups": c.get("norm_groups", 32),
        "scaling_factor": c.get("scaling_factor", 0.18215),
    }
    if c.get("shift_factor"):
        out["shift_factor"] = c["shift_factor"]
    for key in ("use_quant_conv", "use_post_quant_conv"):  # SD3's VAE: none (diffusers' default: both)
        if not c.get(key, True):
            out[key] = False
    if sample_size is not None:
        out["sample_size"] = sample_size
    return out


def vae_config_from_diffusers(cfg: dict) -> dict:
    """diffusers ``AutoencoderKL`` config -> our VAE kwargs."""
    checks = {"act_fn": "silu", "mid_block_add_attention": True}
    for key, want in checks.items():
        if cfg.get(key, want) != want:
            raise ValueError(f"unsupported diffusers VAE setting {key}={cfg[key]!r} (need {want!r})")
    blocks = list(cfg["block_out_channels"])
    base = blocks[0]
    if any(b % base for b in blocks):
        raise ValueError(f"block_out_channels {blocks} are not multiples of {base}")
    out = {
        "in_channels": cfg.get("in_channels", 3),
        "out_channels": cfg.get("out_channels", 3),
        "latent_channels": cfg.get("latent_channels", 4),
        "base_channels": base,
        "channel_mult": [b // base for b in blocks],
        "num_res_blocks": cfg.get("layers_per_block", 1),
        "dropout": 0.0,
        "scaling_factor": cfg.get("scaling_factor", 0.18215),
        "shift_factor": cfg.get("shift_factor") or 0.0,
        "norm_groups": cfg.get("norm_num_groups", 32),
    }
    for key in ("use_quant_conv", "use_post_quant_conv"):  # SD3's VAE: False (diffusers' default: True)
        value = cfg.get(key, True)
        if not isinstance(value, bool):
            raise ValueError(f"diffusers VAE setting {key}={value!r} must be true or false")
        out[key] = value
    return out
