"""MMDiT: Stable Diffusion 3's multimodal diffusion transformer (Esser et al. 2024, sec. 4, Fig. 2), with the
SD3.5 options (MMDiT-X: a second, image-only self-attention in the first blocks; QK RMSNorm).

    x (B, C, H, W) --patchify (p x p conv)--> (B, N, D) + cropped 2-D sincos positional embedding
    c = MLP(timestep embedding(t)) + MLP(pooled text y)                      (the adaLN conditioning vector)
    ctx (B, L, joint_attention_dim) --Linear--> (B, L, D)
    for each joint block: both streams adaLN-Zero-modulated by c; ONE attention over [image tokens; text tokens]
        with each stream's own q/k/v and output projections; each stream its own MLP.
        The last block is context-pre-only: its text stream only gives keys and values (no output, no MLP).
    final layer: adaLN (shift, scale) + Linear -> (B, N, p*p*C) --unpatchify--> (B, C, H, W)

Parameter names are the original SD3 checkpoint's (Stability's ``mmdit.py``, what ComfyUI loads under
``model.diffusion_model.``): ``x_embedder.proj``, ``pos_embed``, ``t_embedder.mlp.{0,2}``, ``y_embedder.mlp.{0,2}``,
``context_embedder``, ``joint_blocks.N.{x_block,context_block}.{adaLN_modulation.1, attn.qkv, attn.proj,
attn.ln_q, attn.ln_k, attn2.*, mlp.fc1, mlp.fc2}``, ``final_layer.{adaLN_modulation.1, linear}``.
diffusers' ``SD3Transformer2DModel`` layout is a key map away (``ldm.formats.sd3_diffusers_keys``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.config_fields import bounded, config_of, record
from ldm.models.layers import timestep_embedding
from ldm.models.rope import Rope, apply_rope

FREQUENCY_DIM = 256  # the sinusoidal timestep embedding's width (DiT's frequency_embedding_size)


@dataclass
class MMDiTConfig:
    """The MMDiT's architecture; field names and defaults as diffusers' SD3Transformer2DModel config (SD3-medium).

    Width D = num_attention_heads x attention_head_dim (the text stream has the same width: diffusers'
    caption_projection_dim must equal it). sample_size: the training latent size; the positional embedding is a
    pos_embed_max_size^2 grid of 2-D sincos features scaled so that sample_size / patch_size patches span
    [0, sample_size / patch_size), cropped around its centre to each input's patch grid.
    dual_attention_layers: the blocks with MMDiT-X's second image-only attention (SD3.5-medium: 0..12);
    qk_norm: "rms_norm" (SD3.5) or None."""

    sample_size: int = bounded(128, 1, 4096)
    patch_size: int = bounded(2, 1, 16)
    in_channels: int = bounded(16, 1, 256)
    num_layers: int = bounded(18, 1, 128)
    attention_head_dim: int = bounded(64, 2, 1024)
    num_attention_heads: int = bounded(18, 1, 256)
    joint_attention_dim: int = bounded(4096, 1, 16384)
    pooled_projection_dim: int = bounded(2048, 1, 16384)
    out_channels: int = bounded(16, 1, 256)
    pos_embed_max_size: int = bounded(96, 1, 4096)
    dual_attention_layers: tuple[int, ...] = bounded((), 0, 127)
    qk_norm: str | None = bounded(None, choices=("rms_norm", None))
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"MMDiT dual_attention_layers {bad} out of range for {self.num_layers} layers")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"MMDiT qk_norm must be 'rms_norm' or null, got {self.qk_norm!r}")
        if self.dim % 2:
            raise ValueError(f"MMDiT width {self.dim} (heads x head dim) must be even for the sincos embedding")
        if (self.dim // 2) % 2:
            raise ValueError(f"MMDiT width {self.dim} must be divisible by 4 (two 1-D sincos embeddings)")
        if self.sample_size < self.patch_size:
            raise ValueError(f"MMDiT sample_size {self.sample_size} is smaller than patch_size {self.patch_size}")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def sincos_2d(dim: int, grid: int, base_size: int) -> Tensor:
    """(grid^2, dim) 2-D sincos positions (MAE / DiT): positions arange(grid) * base_size / grid on each axis;
    the first dim/2 features encode the column (w), the rest the row (h) (MAE's and diffusers' order); each half is [sin(pos w_i), cos(pos w_i)]
    with w_i = 10000^(-i / (dim/4)) (diffusers' get_2d_sincos_pos_embed with interpolation_scale 1)."""
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_d(p: Tensor) -> Tensor:
        out = torch.outer(p.reshape(-1).double(), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # rows[h, w] = pos[h], cols[h, w] = pos[w]
    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019), in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Embedder(nn.Module):
    """Linear - SiLU - Linear (DiT's TimestepEmbedder / SD3's y_embedder): keys mlp.0, mlp.2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """p x p patches -> D channels (a stride-p conv), flattened row-major into (B, N, D)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class StreamAttention(nn.Module):
    """One stream's projections of the joint attention: qkv, optional per-head RMSNorm of q and k, output proj
    (absent in a pre-only stream)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q, self.ln_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, D) -> q, k, v each (B, heads, N, head_dim), q and k normalised when qk_norm."""
        q, k, v = split_heads(self.qkv(x), self.heads)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """A fused projection (B, N, 3 D), laid out [q; k; v] with heads then head dims, -> q, k, v (B, heads, N, d)."""
    B, N, D3 = qkv.shape
    return qkv.reshape(B, N, 3, heads, D3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) -> (B, N, heads * d)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (1 + scale) + shift, per sample (DiT eq. for adaLN)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class StreamBlock(nn.Module):
    """One stream (image x or text context) of a joint block, adaLN-Zero modulated (DiT sec. 3.2).

    Modulation chunks: 6 (shift/scale/gate of attention and MLP), 2 (shift, scale: a pre-only stream), or 9 (+ the
    shift/scale/gate of MMDiT-X's second attention)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.pre_only, self.dual_attention = pre_only, dual_attention
        chunks = 2 if pre_only else (9 if dual_attention else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))
        self.attn = StreamAttention(dim, heads, qk_norm, pre_only)
        if dual_attention:
            self.attn2 = StreamAttention(dim, heads, qk_norm)
        if not pre_only:
            self.mlp = Mlp(dim, 4 * dim)

    @staticmethod
    def norm(x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)  # no affine parameters: adaLN supplies them

    def modulations(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.adaLN_modulation(c).chunk(2 if self.pre_only else (9 if self.dual_attention else 6), dim=1)


class JointBlock(nn.Module):
    """One MMDiT block: joint attention over [image tokens; text tokens] (SD3 Fig. 2b)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, context_pre_only: bool, dual_attention: bool):
        super().__init__()
        self.context_block = StreamBlock(dim, heads, qk_norm, pre_only=context_pre_only)
        self.x_block = StreamBlock(dim, heads, qk_norm, dual_attention=dual_attention)

    def forward(self, context: Tensor, x: Tensor, c: Tensor, rope: Rope | None = None) -> tuple[Tensor | None, Tensor]:
        """rope: rotary positions of the [image; text] tokens (Flux.1's double-stream block), applied to the
        normalised q and k; None for SD3 (its positions are added to the image tokens)."""
        n_img = x.shape[1]
        x_block, ctx_block = self.x_block, self.context_block
        x_mods = x_block.modulations(c)
        x_normed = x_block.norm(x)
        xq, xk, xv = x_block.attn.qkv_heads(modulate(x_normed, x_mods[0], x_mods[1]))
        c_mods = ctx_block.modulations(c)
        cq, ck, cv = ctx_block.attn.qkv_heads(modulate(ctx_block.norm(context), c_mods[0], c_mods[1]))
        # one attention over both streams, image tokens first (diffusers' JointAttnProcessor2_0 order)
        q, k = torch.cat([xq, cq], 2), torch.cat([xk, ck], 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        joint = attention(q, k, torch.cat([xv, cv], 2))
        x_attn, c_attn = joint[:, :n_img], joint[:, n_img:]

        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = x_mods[:6]
        x = x + gate_msa[:, None] * x_block.attn.proj(x_attn)
        if x_block.dual_attention:  # MMDiT-X (SD3.5): image-only attention of the block's input, own modulation
            shift2, scale2, gate2 = x_mods[6:]
            q2, k2, v2 = x_block.attn2.qkv_heads(modulate(x_normed, shift2, scale2))
            x = x + gate2[:, None] * x_block.attn2.proj(attention(q2, k2, v2))
        x = x + gate_mlp[:, None] * x_block.mlp(modulate(x_block.norm(x), shift_mlp, scale_mlp))

        if ctx_block.pre_only:
            return None, x
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
        context = context + c_gate_msa[:, None] * ctx_block.attn.proj(c_attn)
        context = context + c_gate_mlp[:, None] * ctx_block.mlp(modulate(ctx_block.norm(context), c_shift_mlp,
                                                                          c_scale_mlp))
        return context, x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear to p*p*C per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(StreamBlock.norm(x), shift, scale))


def transformer_inputs(name: str, encoders: str, x: Tensor, t: Tensor, context, y: Tensor | None,
                       patch_size: int) -> tuple[Tensor, Tensor]:
    """A transformer denoiser's inputs checked, each error naming what to pass: -> (t as (B,), the pooled text y
    (``context['vector']`` unless given))."""
    if not isinstance(context, dict) or "crossattn" not in context:
        raise ValueError(f"{name} needs context={{'crossattn': (B, L, D_text), 'vector': (B, D_pooled)}}: the text "
                         f"tokens and the pooled text ({encoders})")
    y = context.get("vector") if y is None else y
    if y is None:
        raise ValueError(f"{name} needs the pooled text vector (context['vector'])")
    B, _, H, W = x.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"{name}: the latent size {H} x {W} is not a multiple of patch_size={patch_size}")
    t = torch.as_tensor(t, device=x.device)
    return (t.expand(B) if t.ndim == 0 else t), y


class MMDiT(nn.Module):
    """SD3's denoiser: ``MMDiT(MMDiTConfig(...))`` or the config's fields as keywords (Hydra, stored configs).

    ``forward(x, t, context)``: x (B, C, H, W) with H, W multiples of patch_size; t (B,) the network timestep
    (flow matching: sigma * 1000); context {"crossattn": (B, L, joint_attention_dim), "vector": (B,
    pooled_projection_dim)} (SGM's conditioner dict, as SDXL's U-Net takes it)."""

    def __init__(self, *args: Any, **arguments: Any):
        super().__init__()
        config = config_of(MMDiTConfig, args, arguments)
        self.config = record(config)
        self.patch_size, self.out_channels, self.in_channels = config.patch_size, config.out_channels, config.in_channels
        self.pos_embed_max_size = config.pos_embed_max_size
        self.downsample_factor = config.patch_size  # latent sides must be multiples of it (as the U-Net's factor)
        self.gradient_checkpointing = config.gradient_checkpointing
        dim, heads = config.dim, config.num_attention_heads
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, dim)
        # a buffer in the state dict (the original checkpoints store it); not trained
        self.register_buffer("pos_embed", sincos_2d(dim, config.pos_embed_max_size,
                                                    config.sample_size // config.patch_size)[None])
        self.t_embedder = Embedder(FREQUENCY_DIM, dim)
        self.y_embedder = Embedder(config.pooled_projection_dim, dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        last = config.num_layers - 1
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, heads, config.qk_norm is not None, context_pre_only=i == last,
                       dual_attention=i in config.dual_attention_layers)
            for i in range(config.num_layers))
        self.final_layer = FinalLayer(dim, config.patch_size, config.out_channels)
        self._zero_init()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MMDiT":
        """MMDiT.from_preset("sd35_medium", gradient_checkpointing=True): MMDIT_PRESETS[name] updated by overrides."""
        if name not in MMDIT_PRESETS:
            raise ValueError(f"unknown MMDiT preset {name!r}; available: {', '.join(sorted(MMDIT_PRESETS))}")
        return cls(**{**MMDIT_PRESETS[name], **overrides})

    def _zero_init(self) -> None:
        """adaLN-Zero (DiT sec. 3.2): every modulation and the output projection start at zero, so each block
        starts as the identity and the network outputs 0."""
        for block in self.joint_blocks:
            for stream in (block.x_block, block.context_block):
                nn.init.zeros_(stream.adaLN_modulation[1].weight)
                nn.init.zeros_(stream.adaLN_modulation[1].bias)
        for p in (*self.final_layer.adaLN_modulation[1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def lora_targets(self, preset: str) -> dict[str, nn.Module]:
        """The layers an adapter preset adapts (``ldm.models.lora.unet_targets``): attention: every stream's
        ``attn.qkv`` / ``attn.proj`` (and MMDiT-X's ``attn2``); attention_ff: + the MLPs; full: + the adaLN
        modulations, the embedders and the final layer."""
        out: dict[str, nn.Module] = {}
        for name, module in self.named_modules():
            if type(module) is not nn.Linear:
                continue
            in_attention = ".attn." in f".{name}" or ".attn2." in f".{name}"
            in_mlp = name.endswith((".mlp.fc1", ".mlp.fc2"))  # the blocks' MLPs, not the embedders'
            if in_attention or (in_mlp and preset in ("attention_ff", "full")) or preset == "full":
                out[name] = module
        if preset == "full":
            out["x_embedder.proj"] = self.x_embedder.proj
        return out

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre h x w patches of the pos_embed_max_size^2 grid, (1, h w, D)."""
        m = self.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(f"MMDiT: a {h} x {w} patch grid exceeds pos_embed_max_size={m}; use a smaller image")
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.reshape(1, m, m, -1)[:, top:top + h, left:left + w]
        return grid.reshape(1, h * w, -1)

    def forward(self, x: Tensor, t: Tensor, context: dict[str, Tensor] | None, y: Tensor | None = None) -> Tensor:
        t, y = transformer_inputs("MMDiT", "SD3's CLIP-L + CLIP-G (+ T5) encoders", x, t, context, y, self.patch_size)
        B, _, H, W = x.shape
        p = self.patch_size
        h = self.x_embedder(x) + self.cropped_pos_embed(H // p, W // p).to(x.dtype)
        c = self.t_embedder(timestep_embedding(t, FREQUENCY_DIM).to(x.dtype)) + self.y_embedder(y.to(x.dtype))
        ctx = self.context_embedder(context["crossattn"].to(x.dtype))
        for block in self.joint_blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                ctx, h = torch.utils.checkpoint.checkpoint(block, ctx, h, c, use_reentrant=False)
            else:
                ctx, h = block(ctx, h, c)
        out = self.final_layer(h, c)  # (B, N, p*p*C), channels ordered (p, q, C)
        out = out.reshape(B, H // p, W // p, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(B, self.out_channels, H, W)


def parameter_count(config: MMDiTConfig | dict) -> int:
    """The trainable parameters of an MMDiT of this config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = MMDiT(**config) if isinstance(config, dict) else MMDiT(config)
    return sum(p.numel() for p in model.parameters())


# Presets: diffusers' published transformer configs (stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-medium, stable-diffusion-3.5-large: transformer/config.json)
MMDIT_PRESETS: dict[str, dict[str, Any]] = {
    "sd3_medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=2048,
                       out_channels=16, pos_embed_max_size=192),
    "sd35_medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=2048,
                        out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                        qk_norm="rms_norm"),
    "sd35_large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                       num_attention_heads=38, joint_attention_dim=4096, pooled_projection_dim=2048,
                       out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
}
