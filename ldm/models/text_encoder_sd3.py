"""SD3's text conditioning: CLIP ViT-L + OpenCLIP bigG (both with projection) and, optionally, T5-XXL
(transformers' ``T5EncoderModel``), as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` combines them:

    clip     = [L.hidden_states[-2], G.hidden_states[-2]]          (B, 77, D_L + D_G), zero-padded to joint_dim
    t5       = T5(ids).last_hidden_state                          (B, t5_length, joint_dim); zeros without a T5
    crossattn = cat([clip, t5], tokens)                           (B, 77 + t5_length, joint_dim)
    vector    = [L.text_embeds, G.text_embeds]                    (B, P_L + P_G): the MMDiT's pooled input

The unconditional branch is the empty prompt's encoding (SD3 has no zeroed uncond).

Training may drop each encoder independently (SD3, Esser et al. 2024: each of the three encoders dropped
with probability 46.3%, so that any subset works at inference, T5 included): a dropped encoder's features are zeros,
as SGM's conditioner zeroes an embedder (``ucg_rate``) and as diffusers feeds the MMDiT without a T5
(``drop_encoders``; ``module.encoder_dropout`` sets the probabilities). The context is cacheable: the latent cache
stores it as one (B, 77 + t5_length + 1, joint_dim) tensor, the pooled vector as the last row
(ldm.models.context_rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models import tiny_clip
from ldm.models.config_fields import bounded, config_of, split_config
from ldm.models.context_rows import pack_rows, unpack_rows
from ldm.models.text_encoder import tiny_clip_folder

log = logging.getLogger(__name__)

ENCODERS = ("clip_l", "clip_g", "t5")  # the names module.encoder_dropout uses


@dataclass
class SD3TextOptions:
    """How SD3's encoders are used. joint_dim: the width of the token context (T5-XXL's 4096); t5_length: the T5
    tokens (diffusers' max_sequence_length, 256), zeros when no T5 is loaded."""

    max_length: int = bounded(77, 1, 4096)
    joint_dim: int = bounded(4096, 1, 16384)
    t5_length: int = bounded(256, 0, 4096)
    frozen: bool = True


class SD3TextEncoder(nn.Module):
    """Prompts -> ``{"crossattn": (B, max_length + t5_length, joint_dim), "vector": (B, P_L + P_G)}``."""

    zero_uncond = False
    encoder_names = ENCODERS

    def __init__(self, model_1, tokenizer_1, model_2, tokenizer_2, t5=None, t5_tokenizer=None, *args: Any,
                 **arguments: Any):
        super().__init__()
        o = config_of(SD3TextOptions, args, arguments)
        for name, m in (("text_encoder", model_1), ("text_encoder_2", model_2)):
            if not hasattr(m, "text_projection"):
                raise ValueError(f"SD3TextEncoder: {name} must be a CLIPTextModelWithProjection (SD3's pooled vector "
                                 "is both CLIPs' projected embeddings)")
        if model_1.config.hidden_size + model_2.config.hidden_size > o.joint_dim:
            raise ValueError(f"SD3TextEncoder: the CLIP widths ({model_1.config.hidden_size} + "
                             f"{model_2.config.hidden_size}) exceed joint_dim={o.joint_dim}")
        if t5 is not None and t5.config.d_model != o.joint_dim:
            raise ValueError(f"SD3TextEncoder: T5's width {t5.config.d_model} is not joint_dim={o.joint_dim}")
        self.model, self.model_2, self.t5 = model_1, model_2, t5
        self.tokenizer, self.tokenizer_2, self.t5_tokenizer = tokenizer_1, tokenizer_2, t5_tokenizer
        self.max_length, self.joint_dim, self.t5_length, self.frozen = o.max_length, o.joint_dim, o.t5_length, o.frozen
        self.max_chunks = 1
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    @classmethod
    def from_pretrained(cls, path_or_hub_id, use_t5: bool = True, **options) -> "SD3TextEncoder":
        """``tokenizer{,_2,_3}/`` + ``text_encoder{,_2,_3}/`` of a diffusers SD3 folder (the T5 pair optional)."""
        from pathlib import Path

        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        from ldm.models.clip_bounds import bounded_t5_config, bounded_text_config

        path = str(path_or_hub_id)
        models = []
        for sub in ("text_encoder", "text_encoder_2"):
            models.append(CLIPTextModelWithProjection.from_pretrained(
                path, subfolder=sub, config=bounded_text_config(path, sub, CLIPTextModelWithProjection)))
        toks = [CLIPTokenizer.from_pretrained(path, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
        t5 = t5_tok = None
        # a local folder may lack the T5 (diffusers saves text_encoder_3=None so); a hub id the user chose is a
        # whole SD3 repo, whose T5 transformers loads (from this machine's cache, or downloading it)
        has_t5 = (Path(path) / "text_encoder_3").is_dir() if Path(path).is_dir() else True
        if use_t5 and not has_t5:
            log.warning("%s has no text_encoder_3/: SD3's T5 tokens are zeros (as diffusers with text_encoder_3=None)",
                        Path(path).name)
        if use_t5 and has_t5:
            from transformers import AutoTokenizer, T5EncoderModel

            t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3",
                                                config=bounded_t5_config(path, "text_encoder_3"))
            t5_tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3")
        return cls(models[0], toks[0], models[1], toks[1], t5, t5_tok, **options)

    @classmethod
    def from_tiny(cls, *args: Any, **arguments: Any) -> "SD3TextEncoder":
        """A local random pair of tiny projected CLIPs (no T5: its tokens are zeros, as diffusers without one)."""
        config, options = split_config(TinySD3TextConfig, args, arguments)
        with tiny_clip_folder(config.folder, "tiny_sd3_clip_") as folder:
            return cls.from_pretrained(write_tiny_sd3_clips(config, folder), use_t5=False, **options)

    @property
    def config(self) -> dict:
        return {"max_length": self.max_length, "joint_dim": self.joint_dim, "t5_length": self.t5_length,
                "kind": "sd3"}

    @property
    def context_dim(self) -> int:
        return self.joint_dim

    @property
    def context_cacheable(self) -> bool:
        """The latent cache can store the context when the pooled vector fits a row (SD3: 2048 <= 4096)."""
        return self.pooled_dim <= self.joint_dim

    def cache_rows(self, context: dict[str, torch.Tensor]) -> torch.Tensor:
        """The context as the latent cache stores it: (B, L + 1, joint_dim), the pooled vector last."""
        return pack_rows(context["crossattn"], context["vector"])

    def from_cache_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, pooled = unpack_rows(rows, self.pooled_dim)
        return {"crossattn": tokens, "vector": pooled}

    def drop_t5(self) -> None:
        """Sample without the T5 (sample.py t5=false): its tokens are zeros, as diffusers' pipeline with
        text_encoder_3=None; the memory it held is freed."""
        self.t5 = self.t5_tokenizer = None

    def drop_encoders(self, context: dict[str, torch.Tensor], dropped: torch.Tensor) -> dict[str, torch.Tensor]:
        """``dropped`` (B, 3) bool, columns ENCODERS -> the context with each dropped encoder's features zeroed:
        CLIP-L's / CLIP-G's columns of the first max_length tokens and their halves of the pooled vector, T5's
        tokens. The others are unchanged (no in-place write: gradients flow as before)."""
        crossattn, vector = context["crossattn"], context["vector"]
        if dropped.shape != (crossattn.shape[0], len(ENCODERS)):
            raise ValueError(f"drop_encoders: a ({crossattn.shape[0]}, {len(ENCODERS)}) mask is needed, got "
                             f"{tuple(dropped.shape)}")
        keep = (~dropped).to(device=crossattn.device, dtype=crossattn.dtype)
        kl, kg, kt = (keep[:, i, None, None] for i in range(3))
        d_l, d_g = self.model.config.hidden_size, self.model_2.config.hidden_size
        p_l = self.model.config.projection_dim
        clip, t5 = crossattn[:, :self.max_length], crossattn[:, self.max_length:]
        clip = torch.cat([clip[..., :d_l] * kl, clip[..., d_l:d_l + d_g] * kg, clip[..., d_l + d_g:]], dim=-1)
        vector = torch.cat([vector[:, :p_l] * kl[:, 0], vector[:, p_l:] * kg[:, 0]], dim=-1)
        return {**context, "crossattn": torch.cat([clip, t5 * kt], dim=1), "vector": vector}

    @property
    def pooled_dim(self) -> int:
        return self.model.config.projection_dim + self.model_2.config.projection_dim

    def train(self, mode: bool = True):
        return super().train(False if self.frozen else mode)

    def _clip(self, model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = model(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def forward(self, prompts) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            h1, p1 = self._clip(self.model, self.tokenizer, prompts)
            h2, p2 = self._clip(self.model_2, self.tokenizer_2, prompts)
            clip = torch.cat([h1, h2], dim=-1)
            clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))  # zero-padded to the T5 width
            if self.t5 is None:
                t5 = clip.new_zeros(len(prompts), self.t5_length, self.joint_dim)
            else:
                ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                                        return_tensors="pt").input_ids.to(clip.device)
                t5 = self.t5(ids).last_hidden_state.to(clip.dtype)
            return {"crossattn": torch.cat([clip, t5], dim=1), "vector": torch.cat([p1, p2], dim=-1)}

    def empty_context(self, batch_size: int = 1, chunks: int = 1) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            empty = self([""])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in empty.items()}


@dataclass
class TinySD3TextConfig:
    folder: str | None = None
    seed: int = bounded(0, 0, 2**63 - 1)
    hidden_size: int = bounded(32, 1, 1024)
    hidden_size_2: int = bounded(48, 1, 1024)
    projection_dim: int = bounded(16, 1, 1024)


def write_tiny_sd3_clips(config: TinySD3TextConfig, folder=None):
    """A diffusers-SD3-like folder of two tiny projected CLIPs (written once per folder; default config.folder)."""
    from pathlib import Path

    from transformers import CLIPTextModelWithProjection

    folder = Path(folder if folder is not None else config.folder)
    if (folder / "text_encoder_2" / "model.safetensors").is_file():
        return folder
    for i, (sub, width) in enumerate((("", config.hidden_size), ("_2", config.hidden_size_2))):
        vocab = tiny_clip.write_tokenizer(folder / f"tokenizer{sub}", pad_token="!" if sub else tiny_clip.EOS)
        cfg = tiny_clip.tiny_clip_config(len(vocab), vocab[tiny_clip.BOS], vocab[tiny_clip.EOS], width)
        cfg.projection_dim = config.projection_dim
        if sub:
            cfg.hidden_act, cfg.pad_token_id = "gelu", vocab["!"]
        tiny_clip._write_model(folder / f"text_encoder{sub}", CLIPTextModelWithProjection, cfg, config.seed + i)
    return folder
