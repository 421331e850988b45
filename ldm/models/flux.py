"""Flux.1: Black Forest Labs' rectified-flow transformer (FLUX.1-dev / -schnell), an MMDiT with rotary positions
and a second kind of block.

    x (B, C, H, W) --pack 2x2 patches--> (B, N, 4 C) --img_in (Linear)--> (B, N, D)
    ctx (B, L, joint_attention_dim) --txt_in (Linear)--> (B, L, D)
    c = time_in(t) + vector_in(pooled text) [+ guidance_in(guidance)]         (the adaLN conditioning vector)
    rope: 3-axis rotary positions of the tokens: image patch (0, row, column), text token (0, 0, 0)
    num_layers double-stream blocks: SD3's joint block (``ldm.models.mmdit.JointBlock``: each stream its own
        adaLN-Zero modulation, q/k/v with QK RMSNorm, output projection and MLP; ONE attention over both streams),
        with the rotary positions applied to q and k
    num_single_layers single-stream blocks over [image; text] tokens: one adaLN (shift, scale, gate), one Linear
        giving q, k, v and the MLP input in parallel, attention and GELU(MLP) concatenated into one output Linear
    final layer (``mmdit.FinalLayer``): adaLN (shift, scale) + Linear on the image tokens -> unpack -> (B, C, H, W)

Packing is diffusers' ``FluxPipeline._pack_latents`` (each token's features ordered channel, row, column of its
patch). Timesteps: ``t`` is the network timestep sigma * 1000 (as our MMDiT; diffusers' model takes sigma and
multiplies by 1000); the guidance of FLUX.1-dev (guidance-distilled) is the CFG scale, embedded as scale * 1000
(BFL's ``timestep_embedding(guidance, 256)`` with time_factor 1000).

Parameter names are ours (the MMDiT's, where the modules are the MMDiT's); the original BFL layout
(``double_blocks.0.img_attn.qkv``, what ComfyUI loads) and diffusers' ``FluxTransformer2DModel`` are key maps
away (``ldm.formats.flux_keys``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.config_fields import bounded, config_of, record
from ldm.models.layers import timestep_embedding
from ldm.models.mmdit import (FREQUENCY_DIM, Embedder, FinalLayer, JointBlock, RMSNorm, StreamBlock, attention,
                              modulate, split_heads, transformer_inputs)
from ldm.models.rope import Rope, apply_rope, rope_frequencies

GUIDANCE_FACTOR = 1000.0  # the guidance scale is embedded as a timestep: scale * 1000


@dataclass
class FluxConfig:
    """Flux.1's architecture. Names as diffusers' FluxTransformer2DModel config, except that in_channels /
    out_channels are the latent's channels (16 for Flux.1) and patch_size the packing (2): diffusers' model sees
    packed tokens (its in_channels = 64 = 16 x 2 x 2, its patch_size 1).

    Width D = num_attention_heads x attention_head_dim; axes_dims_rope: the head dims each rotary axis rotates
    (they sum to attention_head_dim); guidance_embeds: FLUX.1-dev's guidance embedding (schnell has none);
    train_guidance: the guidance a guidance-embedding model gets when its context has none (training; SimpleTuner's
    and ai-toolkit's default 1.0 for fine-tuning FLUX.1-dev)."""

    in_channels: int = bounded(16, 1, 256)
    out_channels: int = bounded(16, 1, 256)
    patch_size: int = bounded(2, 1, 16)
    num_layers: int = bounded(19, 0, 128)
    num_single_layers: int = bounded(38, 0, 256)
    attention_head_dim: int = bounded(128, 2, 1024)
    num_attention_heads: int = bounded(24, 1, 256)
    joint_attention_dim: int = bounded(4096, 1, 16384)
    pooled_projection_dim: int = bounded(768, 1, 16384)
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = bounded((16, 56, 56), 0, 1024)
    theta: float = bounded(10000.0, 1.0, 1e9)
    train_guidance: float = bounded(1.0, 0.0, 100.0)
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.axes_dims_rope = tuple(int(d) for d in self.axes_dims_rope)
        if len(self.axes_dims_rope) != 3:
            raise ValueError(f"Flux axes_dims_rope must give 3 axes (text/index, row, column), got "
                             f"{list(self.axes_dims_rope)}")
        if any(d % 2 for d in self.axes_dims_rope) or sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"Flux axes_dims_rope {list(self.axes_dims_rope)} must be even and sum to "
                             f"attention_head_dim={self.attention_head_dim}")
        if self.num_layers + self.num_single_layers == 0:
            raise ValueError("Flux needs at least one block (num_layers + num_single_layers > 0)")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def pack_latents(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C p p): row-major patches, features ordered (channel, row, column)
    (diffusers' FluxPipeline._pack_latents for p = 2)."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpack_latents(tokens: Tensor, p: int, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for a (height, width) latent (FluxPipeline._unpack_latents)."""
    B, _, F_ = tokens.shape
    C = F_ // (p * p)
    x = tokens.reshape(B, height // p, width // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, height, width)


def position_ids(h: int, w: int, text_tokens: int, device=None) -> Tensor:
    """The rotary ids of the [image; text] tokens, (h w + L, 3): image patch (0, row, column), text (0, 0, 0)
    (diffusers' _prepare_latent_image_ids and its zero text_ids)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
    return torch.cat([image, torch.zeros(text_tokens, 3, dtype=image.dtype, device=device)])


class SingleStreamBlock(nn.Module):
    """Flux.1's single-stream block (parallel attention and MLP, Dehghani et al. 2023's ViT-22B layout):

        h = LN(x) (1 + scale) + shift;   [q; k; v; m] = linear1(h)
        x + gate * linear2([attention(RMSNorm(q), RMSNorm(k) rotated, v); GELU_tanh(m)])"""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.heads, self.mlp_hidden = dim, heads, int(dim * mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.ln_q, self.ln_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)

    def forward(self, x: Tensor, c: Tensor, rope: Rope) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        qkv, mlp = self.linear1(modulate(StreamBlock.norm(x), shift, scale)).split([3 * self.dim, self.mlp_hidden],
                                                                                    dim=-1)
        q, k, v = split_heads(qkv, self.heads)
        q, k = apply_rope(self.ln_q(q), rope), apply_rope(self.ln_k(k), rope)
        out = self.linear2(torch.cat([attention(q, k, v), F.gelu(mlp, approximate="tanh")], dim=-1))
        return x + gate[:, None] * out


class Flux(nn.Module):
    """Flux.1's denoiser: ``Flux(FluxConfig(...))`` or the config's fields as keywords (Hydra, stored configs).

    ``forward(x, t, context)``: x (B, C, H, W) with H, W multiples of patch_size; t (B,) the network timestep
    sigma * 1000; context {"crossattn": (B, L, joint_attention_dim), "vector": (B, pooled_projection_dim),
    optionally "guidance": (B,) the distilled guidance scale (models with guidance_embeds)}."""

    def __init__(self, *args: Any, **arguments: Any):
        super().__init__()
        config = config_of(FluxConfig, args, arguments)
        self.config = record(config)
        self.patch_size, self.in_channels = config.patch_size, config.in_channels
        self.out_channels = config.out_channels
        self.downsample_factor = config.patch_size  # latent sides must be multiples of it (as the U-Net's factor)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.guidance_embeds, self.train_guidance = config.guidance_embeds, config.train_guidance
        self.axes_dims_rope, self.theta = config.axes_dims_rope, config.theta
        dim, heads, p = config.dim, config.num_attention_heads, config.patch_size
        self.img_in = nn.Linear(config.in_channels * p * p, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.time_in = Embedder(FREQUENCY_DIM, dim)
        self.vector_in = Embedder(config.pooled_projection_dim, dim)
        if config.guidance_embeds:
            self.guidance_in = Embedder(FREQUENCY_DIM, dim)
        # Flux's double-stream block is SD3's joint block with QK RMSNorm, no pre-only stream, no dual attention
        self.double_blocks = nn.ModuleList(JointBlock(dim, heads, qk_norm=True, context_pre_only=False,
                                                      dual_attention=False) for _ in range(config.num_layers))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim, heads) for _ in range(config.num_single_layers))
        self.final_layer = FinalLayer(dim, p, config.out_channels)
        self._zero_init()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Flux":
        """Flux.from_preset("flux_dev", gradient_checkpointing=True): FLUX_PRESETS[name] updated by overrides."""
        if name not in FLUX_PRESETS:
            raise ValueError(f"unknown Flux preset {name!r}; available: {', '.join(sorted(FLUX_PRESETS))}")
        return cls(**{**FLUX_PRESETS[name], **overrides})

    def _zero_init(self) -> None:
        """adaLN-Zero (DiT sec. 3.2) for training from scratch: every modulation and the output projection start at
        zero, so every block starts as the identity and the network outputs 0."""
        modulations = [s.adaLN_modulation[1] for b in self.double_blocks for s in (b.x_block, b.context_block)]
        modulations += [b.adaLN_modulation[1] for b in self.single_blocks]
        for layer in (*modulations, self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def lora_targets(self, preset: str) -> dict[str, nn.Module]:
        """The layers an adapter preset adapts: attention: the double blocks' ``attn.qkv`` / ``attn.proj`` and the
        single blocks' ``linear1`` / ``linear2`` (attention and MLP fused, as kohya's Flux LoRAs adapt them);
        attention_ff: + the double blocks' MLPs; full: every Linear."""
        out: dict[str, nn.Module] = {}
        for name, module in self.named_modules():
            if type(module) is not nn.Linear:
                continue
            in_attention = ".attn." in name or name.endswith((".linear1", ".linear2"))
            in_mlp = name.endswith((".mlp.fc1", ".mlp.fc2"))
            if in_attention or (in_mlp and preset in ("attention_ff", "full")) or preset == "full":
                out[name] = module
        return out

    def conditioning(self, t: Tensor, y: Tensor, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        """c = time_in(emb(t)) + vector_in(y) [+ guidance_in(emb(1000 g))] (diffusers'
        CombinedTimestepGuidanceTextProjEmbeddings)."""
        c = self.time_in(timestep_embedding(t, FREQUENCY_DIM).to(dtype)) + self.vector_in(y.to(dtype))
        if self.guidance_embeds:
            g = guidance.to(device=t.device, dtype=torch.float32) * GUIDANCE_FACTOR
            c = c + self.guidance_in(timestep_embedding(g, FREQUENCY_DIM).to(dtype))
        return c

    def forward(self, x: Tensor, t: Tensor, context: dict[str, Tensor] | None, y: Tensor | None = None) -> Tensor:
        t, y = transformer_inputs("Flux", "Flux.1: T5-XXL tokens, CLIP-L pooled", x, t, context, y, self.patch_size)
        B, _, H, W = x.shape
        p = self.patch_size
        guidance = context.get("guidance")
        if self.guidance_embeds and guidance is None:
            guidance = torch.full((B,), self.train_guidance, device=x.device)
        elif guidance is not None:
            if not self.guidance_embeds:
                raise ValueError("context['guidance'] given to a Flux without a guidance embedding "
                                 "(guidance_embeds=false, as FLUX.1-schnell): use classifier-free guidance instead")
            guidance = torch.as_tensor(guidance, device=x.device)
            guidance = guidance.expand(B) if guidance.ndim == 0 else guidance
        img = self.img_in(pack_latents(x, p))
        txt = self.txt_in(context["crossattn"].to(x.dtype))
        c = self.conditioning(t, y, guidance, x.dtype)
        rope = rope_frequencies(position_ids(H // p, W // p, txt.shape[1], x.device), self.axes_dims_rope, self.theta)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        def run(block, *inputs):
            if checkpointed:
                return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
            return block(*inputs)

        for block in self.double_blocks:
            txt, img = run(block, txt, img, c, rope)
        n_img = img.shape[1]
        tokens = torch.cat([img, txt], dim=1)  # image tokens first, as the rotary ids
        for block in self.single_blocks:
            tokens = run(block, tokens, c, rope)
        out = self.final_layer(tokens[:, :n_img], c)  # (B, N, C p p), features ordered (channel, row, column)
        return unpack_latents(out, p, H, W)


def parameter_count(config: FluxConfig | dict) -> int:
    """The trainable parameters of a Flux of this config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = Flux(**config) if isinstance(config, dict) else Flux(config)
    return sum(p.numel() for p in model.parameters())


# Presets: diffusers' published transformer configs (black-forest-labs/FLUX.1-dev and FLUX.1-schnell:
# transformer/config.json: in_channels 64 = our 16 latent channels packed 2 x 2, patch_size 1)
_FLUX1 = dict(in_channels=16, out_channels=16, patch_size=2, num_layers=19, num_single_layers=38,
              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
              axes_dims_rope=(16, 56, 56))
FLUX_PRESETS: dict[str, dict[str, Any]] = {
    "flux_dev": {**_FLUX1, "guidance_embeds": True},
    "flux_schnell": {**_FLUX1, "guidance_embeds": False},
}
