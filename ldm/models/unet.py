"""The Stable Diffusion U-Net (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"; architecture of Dhariwal & Nichol 2021, "Diffusion Models Beat GANs").

Module and parameter names match the original CompVis `UNetModel` exactly, so the
`model.diffusion_model.*` part of an SD 1.x / 2.x single-file checkpoint loads with
`unet.load_state_dict({k.removeprefix("model.diffusion_model."): v ...})`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ldm.models.config_fields import bounded, config_of, record
from ldm.models.layers import Attention, FeedForward, normalization, timestep_embedding

# -----------------------------------------------------------------------------
# blocks


class ResBlock(nn.Module):
    """Residual block with additive timestep conditioning (DDPM / ADM ResBlock):
    h = conv(silu(norm(x))) + emb;  out = skip(x) + conv(dropout(silu(norm(h))))."""

    def __init__(self, channels, emb_channels, out_channels=None, dropout=0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)  # zero-init the residual branch (original `zero_module`)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        # x: (B, C, H, W), emb: (B, E)
        h = self.in_layers(x)  # (B, C', H, W)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)  # (B, C', H, W)
        return self.skip_connection(x) + h


class BasicTransformerBlock(nn.Module):
    """Pre-LN transformer block: self-attention, cross-attention on the text context, GEGLU MLP."""

    def __init__(self, dim, num_heads, head_dim, context_dim, dropout=0.0):
        super().__init__()
        self.attn1 = Attention(dim, None, num_heads, head_dim, dropout)  # self-attention
        self.ff = FeedForward(dim, mult=4, dropout=dropout)
        self.attn2 = Attention(dim, context_dim, num_heads, head_dim, dropout)  # cross-attention
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        # x: (B, N, D), context: (B, L, context_dim)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the H*W tokens of a feature map, conditioned on `context` by cross-attention.

    proj_in/proj_out are 1x1 convs (SD1) or Linear layers (SD2, use_linear_projection=True).
    """

    def __init__(self, channels, num_heads, head_dim, depth=1, context_dim=768, dropout=0.0, use_linear=False):
        super().__init__()
        inner = num_heads * head_dim
        self.use_linear = use_linear
        self.norm = normalization(channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, num_heads, head_dim, context_dim, dropout) for _ in range(depth)]
        )
        if use_linear:
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # zero-init: the block starts as identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context):
        # x: (B, C, H, W), context: (B, L, context_dim)
        B, C, H, W = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, D, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, D)
        if self.use_linear:
            x = self.proj_in(x)  # (B, H*W, D)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)  # (B, H*W, C)
        x = x.transpose(1, 2).reshape(B, -1, H, W)  # (B, D or C, H, W)
        if not self.use_linear:
            x = self.proj_out(x)  # (B, C, H, W)
        return x + x_in


class Downsample(nn.Module):
    """Stride-2 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# -----------------------------------------------------------------------------
# the U-Net


@dataclass
class UNetConfig:
    """The U-Net's architecture (defaults: SD 1.5). attention_levels are indices into channel_mult of the levels
    that carry SpatialTransformers (original `attention_resolutions` = [2**l for l in attention_levels]).
    Heads: num_head_channels > 0 (SD2: 64) fixes the head width and takes precedence; otherwise num_heads (SD1: 8)
    fixes the number of heads at every level. transformer_depth: one depth for every level, or one per level
    (SDXL: [0, 2, 10]; a level outside attention_levels takes 0); the middle block uses the last level's (SGM
    `transformer_depth_middle` default). adm_in_channels: size of the extra conditioning vector y (SDXL: 2816 =
    pooled text 1280 + 6 x 256 size embeddings), embedded by `label_emb` and added to the timestep embedding (SGM
    openaimodel.py, UNetModel with num_classes="sequential"; diffusers' `add_embedding` of
    addition_embed_type="text_time"). The bounds are what a stored config may ask for (ldm.formats.safe_build)."""

    in_channels: int = bounded(4, 1, 256)
    out_channels: int = bounded(4, 1, 256)
    model_channels: int = bounded(320, 1, 4096)
    channel_mult: tuple[int, ...] = bounded((1, 2, 4, 4), 1, 32)
    num_res_blocks: int = bounded(2, 1, 16)
    attention_levels: tuple[int, ...] = bounded((0, 1, 2), 0, 15)
    num_heads: int = bounded(8, -1, 1024)
    num_head_channels: int = bounded(-1, -1, 4096)
    transformer_depth: int | tuple[int, ...] = bounded(1, 0, 64)
    context_dim: int = bounded(768, 1, 16384)
    use_linear_projection: bool = False
    dropout: float = bounded(0.0, 0.0, 1.0)
    gradient_checkpointing: bool = False
    adm_in_channels: int | None = bounded(None, 1, 65536)

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_levels = tuple(int(lvl) for lvl in self.attention_levels)
        if not isinstance(self.transformer_depth, int):  # a list / tuple / Hydra ListConfig
            self.transformer_depth = tuple(int(d) for d in self.transformer_depth)
        if self.num_head_channels <= 0 and self.num_heads <= 0:
            raise ValueError("UNet needs num_heads > 0 or num_head_channels > 0")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {len(self.channel_mult)} levels")
        self.level_depths()
        if self.adm_in_channels is not None and self.adm_in_channels <= 0:
            raise ValueError(f"adm_in_channels must be a positive size or None, got {self.adm_in_channels}")

    def level_depths(self) -> list[int]:
        return _level_depths(self.transformer_depth, len(self.channel_mult), self.attention_levels)

    def heads(self, ch: int) -> tuple[int, int]:
        """(num_heads, head_dim) of a transformer on ch channels."""
        if self.num_head_channels > 0:
            if ch % self.num_head_channels:
                raise ValueError(f"{ch} channels not divisible by num_head_channels={self.num_head_channels}")
            return ch // self.num_head_channels, self.num_head_channels
        if ch % self.num_heads:
            raise ValueError(f"{ch} channels not divisible by num_heads={self.num_heads}")
        return self.num_heads, ch // self.num_heads


def _transformer(config: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    return SpatialTransformer(ch, *config.heads(ch), depth, config.context_dim, config.dropout,
                              config.use_linear_projection)


def _encoder_blocks(config: UNetConfig, time_dim: int) -> tuple[nn.ModuleList, list[int]]:
    """conv_in, then per level num_res_blocks x (ResBlock [+ transformer]), then a Downsample; and the channels of
    each skip connection, consumed by the decoder."""
    mc, depths = config.model_channels, config.level_depths()
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
    skip_chans, ch = [mc], mc
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            layers = [ResBlock(ch, time_dim, mult * mc, config.dropout)]
            ch = mult * mc
            if level in config.attention_levels:
                layers.append(_transformer(config, ch, depths[level]))
            blocks.append(TimestepEmbedSequential(*layers))
            skip_chans.append(ch)
        if level != len(config.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_chans.append(ch)
    return blocks, skip_chans


def _decoder_blocks(config: UNetConfig, time_dim: int, skip_chans: list[int]) -> nn.ModuleList:
    """Per level (num_res_blocks + 1) x (ResBlock on [h, skip] [+ transformer]), then an Upsample."""
    mc, depths = config.model_channels, config.level_depths()
    skip_chans, ch = list(skip_chans), skip_chans[-1]
    blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(config.channel_mult))):
        for i in range(config.num_res_blocks + 1):
            layers = [ResBlock(ch + skip_chans.pop(), time_dim, mult * mc, config.dropout)]
            ch = mult * mc
            if level in config.attention_levels:
                layers.append(_transformer(config, ch, depths[level]))
            if level > 0 and i == config.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(TimestepEmbedSequential(*layers))
    return blocks


class UNet(nn.Module):
    """Stable Diffusion U-Net: predicts eps (or v) from a noisy latent x_t, the timestep t and a text context.
    Its architecture is a :class:`UNetConfig` (defaults: SD 1.5)."""

    def __init__(self, *args: Any, **arguments: Any):
        """``UNet(UNetConfig(...))``, or the config's fields as keywords (how Hydra and stored configs build it) or
        positionally."""
        super().__init__()
        config = config_of(UNetConfig, args, arguments)
        # plain, JSON-serialisable record of the config: UNet(**unet.config) re-creates it (SD 1.x / 2.x records
        # carry no adm_in_channels)
        self.config = record(config, omit_none=("adm_in_channels",))
        self.in_channels = config.in_channels
        self.downsample_factor = 2 ** (len(config.channel_mult) - 1)
        self.gradient_checkpointing = config.gradient_checkpointing
        time_dim = 4 * config.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(config.model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.adm_in_channels = config.adm_in_channels
        if config.adm_in_channels is not None:  # SGM keys label_emb.0.0 / label_emb.0.2
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(config.adm_in_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
            ))
        self.input_blocks, skip_chans = _encoder_blocks(config, time_dim)
        ch = skip_chans[-1]
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_dim, ch, config.dropout), _transformer(config, ch, config.level_depths()[-1]),
            ResBlock(ch, time_dim, ch, config.dropout)
        )
        self.output_blocks = _decoder_blocks(config, time_dim, skip_chans)
        model_channels = config.model_channels
        self.out = nn.Sequential(normalization(model_channels * config.channel_mult[0]), nn.SiLU(),
                                 nn.Conv2d(model_channels, config.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    @classmethod
    def from_preset(cls, name, **overrides):
        """UNet.from_preset("sd15", context_dim=...) -> UNet with UNET_PRESETS[name] updated by overrides."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; available: {', '.join(sorted(UNET_PRESETS))}")
        return cls(**{**UNET_PRESETS[name], **overrides})

    def _run(self, block, h, emb, context):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, t, context, y=None, control=None):
        """x: (B, in_channels, H, W) noisy latent; t: scalar or (B,) timesteps (int or float);
        context: (B, L, context_dim), or SGM's conditioner dict {"crossattn": context, "vector": y}
        (sgm/modules/diffusionmodules/wrappers.py, OpenAIWrapper); y: (B, adm_in_channels) for a U-Net with
        adm_in_channels (SDXL), else None. control: a ControlNet's residuals ``(down, mid)`` (one per input block,
        added to its skip connection; one added to the middle block's output: cldm ControlledUnetModel, diffusers'
        down_block_additional_residuals / mid_block_additional_residual), or None. Returns (B, out_channels, H, W)."""
        if isinstance(context, dict):
            context, y = context.get("crossattn"), context.get("vector", y)
        B, _, H, W = x.shape
        f = self.downsample_factor
        if H % f != 0 or W % f != 0:
            raise ValueError(f"UNet input spatial size {H}x{W} must be divisible by {f} (2**(len(channel_mult)-1))")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)  # (B,)
        t_emb = timestep_embedding(t, self.config["model_channels"]).to(x.dtype)  # (B, model_channels)
        emb = self.time_embed(t_emb)  # (B, 4*model_channels)
        if self.adm_in_channels is not None:
            if y is None or y.shape != (B, self.adm_in_channels):
                got = None if y is None else tuple(y.shape)
                raise ValueError(f"this UNet (adm_in_channels={self.adm_in_channels}) needs the conditioning vector "
                                 f"y of shape ({B}, {self.adm_in_channels}); got {got}")
            emb = emb + self.label_emb(y.to(emb.dtype))  # SGM UNetModel.forward: emb = emb + label_emb(y)
        elif y is not None:
            raise ValueError("y was given but this UNet has no adm_in_channels (no label_emb)")

        h = x
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if control is not None:
            down, mid = control
            if len(down) != len(skips):
                raise ValueError(f"control has {len(down)} residuals for the U-Net's {len(skips)} input blocks")
            skips = [s + r for s, r in zip(skips, down)]
            h = h + mid
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H', W')
            h = self._run(block, h, emb, context)
        return self.out(h)  # (B, out_channels, H, W)


def _level_depths(transformer_depth, levels, attention_levels):
    """Transformer depth per level (a list of `levels` ints) from an int or a per-level list."""
    if not isinstance(transformer_depth, int):  # a list / tuple / Hydra ListConfig
        depths = [int(d) for d in transformer_depth]
        if len(depths) != levels:
            raise ValueError(f"transformer_depth {depths} needs one depth per level ({levels} levels)")
    else:
        depths = [int(transformer_depth)] * levels
    bad = [lvl for lvl in attention_levels if depths[lvl] < 1]
    if bad:
        raise ValueError(f"transformer_depth {depths} is 0 at attention levels {bad}")
    if depths[-1] < 1:
        raise ValueError(f"transformer_depth {depths}: the middle block takes the last level's depth, which is 0")
    return depths


# -----------------------------------------------------------------------------
# presets

_SD2 = dict(num_heads=-1, num_head_channels=64, use_linear_projection=True, context_dim=1024)

UNET_PRESETS: dict[str, dict] = {
    # Stable Diffusion 1.x (v1-inference.yaml): 859,520,964 parameters
    "sd15": dict(),
    "sd15-inpaint": dict(in_channels=9),
    # Stable Diffusion 2.x (v2-inference(-v).yaml): 865,910,724 parameters
    "sd21": dict(_SD2),
    "sd21-base": dict(_SD2),
    # SDXL base (SGM configs/inference/sd_xl_base.yaml): 2,567,463,684 parameters
    "sdxl": dict(
        channel_mult=(1, 2, 4),
        attention_levels=(1, 2),
        transformer_depth=(0, 2, 10),
        num_heads=-1,
        num_head_channels=64,
        use_linear_projection=True,
        context_dim=2048,
        adm_in_channels=2816,
    ),
    # CPU-sized models for unit tests and short CPU training runs. Keep >= 64 channels at every
    # level: with 32 GroupNorm groups a 32-channel ResBlock normalises each channel on its own,
    # which cancels the (per-channel constant) timestep embedding and makes that level blind to t.
    "tiny": dict(  # 1.42M params, for unit tests
        model_channels=64,
        channel_mult=(1, 1),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        context_dim=32,
    ),
    "small": dict(  # 4.90M params, for short CPU training runs on 8x8 / 16x16 latents
        model_channels=64,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        attention_levels=(1, 2),
        num_heads=-1,
        num_head_channels=32,
        context_dim=256,
    ),
}
