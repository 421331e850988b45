"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of a U-Net's encoder (input blocks + middle block) reads the noisy latent plus a conditioning
image (edges, depth, a mask, ...) encoded to latent size by a small convolutional "hint" encoder; every encoder
output passes through a zero-initialised 1x1 convolution and is added to the frozen U-Net's skip connection
(and the middle block's output), so a fresh ControlNet changes nothing (paper eq. 4: y_c = F(x) + Z(F(x + Z(c)))).

Module and parameter names are lllyasviel's original ``cldm.ControlNet`` (``input_hint_block``, ``zero_convs``,
``middle_block_out``; SGM's ``label_emb`` for SDXL), so the ``control_model.*`` part of ``control_v11*.safetensors``
loads with the prefix stripped; ``ldm.formats.controlnet_keys`` maps diffusers' ``ControlNetModel`` names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from ldm.models.config_fields import bounded, config_of, record
from ldm.models.layers import timestep_embedding
from ldm.models.unet import ResBlock, TimestepEmbedSequential, UNet, UNetConfig, _encoder_blocks, _transformer


@dataclass
class ControlNetConfig(UNetConfig):
    """A ControlNet's architecture: the base U-Net's config (its encoder is copied; ``out_channels`` is kept so a
    U-Net's record carries over whole, and is unused), plus the conditioning image's channels and the hint
    encoder's widths (diffusers' ``conditioning_embedding_out_channels``; lllyasviel: 16, 32, 96, 256 with a
    stride-2 conv between each pair)."""

    conditioning_channels: int = bounded(3, 1, 64)
    hint_channels: tuple[int, ...] = bounded((16, 32, 96, 256), 1, 4096)

    def __post_init__(self):
        super().__post_init__()
        self.hint_channels = tuple(int(c) for c in self.hint_channels)
        if len(self.hint_channels) < 1:
            raise ValueError("hint_channels needs at least one width")


def hint_encoder(config: ControlNetConfig) -> nn.Sequential:
    """Conditioning image (B, conditioning_channels, H, W) -> (B, model_channels, H / 2**(n-1), W / 2**(n-1)), n =
    len(hint_channels): conv3x3 + SiLU, then per width pair conv3x3, SiLU, stride-2 conv3x3, SiLU, and a
    zero-initialised conv3x3 (cldm ``input_hint_block``; diffusers ``ControlNetConditioningEmbedding``)."""
    widths = config.hint_channels
    layers: list[nn.Module] = [nn.Conv2d(config.conditioning_channels, widths[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    out = nn.Conv2d(widths[-1], config.model_channels, 3, padding=1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


def _zero_conv(channels: int) -> TimestepEmbedSequential:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)  # the paper's "zero convolution"
    nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


class ControlNet(nn.Module):
    """``ControlNet(ControlNetConfig(...))`` (or its fields as keywords). ``forward`` returns the residuals the U-Net
    adds: ``(down, mid)``, one per input block and one for the middle block (``UNet.forward(control=...)``)."""

    def __init__(self, *args: Any, **arguments: Any):
        super().__init__()
        config = config_of(ControlNetConfig, args, arguments)
        self.config = record(config, omit_none=("adm_in_channels",))
        self.in_channels = config.in_channels
        self.downsample_factor = 2 ** (len(config.channel_mult) - 1)
        self.hint_factor = 2 ** (len(config.hint_channels) - 1)  # image pixels per latent pixel
        self.gradient_checkpointing = config.gradient_checkpointing
        time_dim = 4 * config.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(config.model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.adm_in_channels = config.adm_in_channels
        if config.adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(config.adm_in_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
            ))
        self.input_hint_block = hint_encoder(config)
        self.input_blocks, skip_chans = _encoder_blocks(config, time_dim)
        self.zero_convs = nn.ModuleList([_zero_conv(ch) for ch in skip_chans])
        ch = skip_chans[-1]
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_dim, ch, config.dropout), _transformer(config, ch, config.level_depths()[-1]),
            ResBlock(ch, time_dim, ch, config.dropout)
        )
        self.middle_block_out = _zero_conv(ch)

    @classmethod
    def from_unet(cls, unet: UNet, *, conditioning_channels: int = 3,
                  hint_channels: tuple[int, ...] = (16, 32, 96, 256), copy_weights: bool = True) -> "ControlNet":
        """A ControlNet of ``unet``'s architecture whose encoder starts as a copy of ``unet``'s weights (the paper's
        initialisation; diffusers ``ControlNetModel.from_unet``); the hint encoder's last conv and the zero convs
        start at zero."""
        unet_fields = {f.name for f in fields(UNetConfig)}
        base = {k: v for k, v in unet.config.items() if k in unet_fields}
        net = cls(**base, conditioning_channels=conditioning_channels, hint_channels=tuple(hint_channels))
        net.to(next(unet.parameters()).device)
        if copy_weights:
            net.load_state_dict(unet_encoder_state(unet), strict=False)
        return net

    def _run(self, block, h, emb, context):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, t, context, hint, y=None, scale: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: (B, in_channels, h, w) noisy latent; t: scalar or (B,); context: (B, L, D) or SGM's conditioner dict;
        hint: (B, conditioning_channels, h * hint_factor, w * hint_factor) in [0, 1] (diffusers' control image
        convention); y: SDXL's vector. Returns ([B, C_i, h_i, w_i] per input block, mid residual), times scale."""
        if isinstance(context, dict):
            context, y = context.get("crossattn"), context.get("vector", y)
        B, _, H, W = x.shape
        want = (H * self.hint_factor, W * self.hint_factor)
        if tuple(hint.shape[-2:]) != want or hint.shape[0] != B:
            raise ValueError(f"control image of shape {tuple(hint.shape)} does not fit latents {tuple(x.shape)}: "
                             f"need ({B}, {self.config['conditioning_channels']}, {want[0]}, {want[1]})")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        emb = self.time_embed(timestep_embedding(t, self.config["model_channels"]).to(x.dtype))
        if self.adm_in_channels is not None:
            if y is None or y.shape != (B, self.adm_in_channels):
                raise ValueError(f"this ControlNet (adm_in_channels={self.adm_in_channels}) needs the vector y of "
                                 f"shape ({B}, {self.adm_in_channels}); got {None if y is None else tuple(y.shape)}")
            emb = emb + self.label_emb(y.to(emb.dtype))
        guided = self.input_hint_block(hint.to(x.dtype))  # (B, model_channels, H, W)
        down = []
        h = x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context)
            if i == 0:
                h = h + guided  # conv_in(x) + hint features (cldm ControlNet.forward)
            down.append(zero(h, emb, context) * scale)
        h = self._run(self.middle_block, h, emb, context)
        return down, self.middle_block_out(h, emb, context) * scale


# the U-Net's parts a ControlNet copies (same names on both)
COPIED = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")


def unet_encoder_state(unet: UNet) -> dict[str, torch.Tensor]:
    """The U-Net's weights a ControlNet starts from (time embedding, vector embedding, input and middle blocks)."""
    return {k: v for k, v in unet.state_dict().items() if k.startswith(COPIED)}


SD_HINT_CHANNELS = (16, 32, 96, 256)  # lllyasviel's input_hint_block widths (SD's VAE: factor 8)


@dataclass
class ControlNetTraining:
    """adapter=controlnet (configs/adapter/controlnet.yaml): train a ControlNet on a frozen base. It starts as a copy
    of the base U-Net's encoder (``init_from``: a ControlNet folder / file to continue instead); ``lr``: its
    learning rate (None: optim.lr)."""

    conditioning_channels: int = 3
    hint_channels: tuple[int, ...] | str = "auto"  # auto: SD's widths, one stride-2 step per halving of the VAE
    init_from: str | None = None
    lr: float | None = None

    def __post_init__(self):
        if self.hint_channels in (None, "auto"):
            self.hint_channels = "auto"
        else:
            self.hint_channels = tuple(int(c) for c in self.hint_channels)
        if not self.hint_channels or min(self.hint_widths(8)) < 1 or self.conditioning_channels < 1:
            raise ValueError(f"adapter: conditioning_channels and hint_channels must be positive, got "
                             f"{self.conditioning_channels}, {self.hint_channels}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"adapter.lr must be > 0 (or null: optim.lr), got {self.lr}")

    def hint_widths(self, factor: int) -> tuple[int, ...]:
        """The hint encoder's widths for a VAE that downsamples by ``factor``: the given ones, or (auto) SD's
        (16, 32, 96, 256) for factor 8, one stride-2 step per halving: (16, 32, 96) for factor 4, 256s beyond."""
        if self.hint_channels != "auto":
            return self.hint_channels
        steps = max(0, int(factor).bit_length() - 1)
        return (SD_HINT_CHANNELS + (SD_HINT_CHANNELS[-1],) * steps)[:steps + 1]
