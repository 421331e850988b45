"""Flux.1's text conditioning, as diffusers' ``FluxPipeline.encode_prompt`` combines its two encoders:

    crossattn = T5(ids).last_hidden_state       (B, t5_length, joint_dim)   Flux's txt_in input (T5-XXL: 4096 wide);
                                                                            zeros without a T5
    vector    = CLIP-L(ids).pooler_output       (B, 768)                    Flux's vector_in input (no projection)

(SD3's wrapper, ``text_encoder_sd3``, does not fit: SD3 puts both CLIPs' tokens beside T5's and pools the projected
CLIP-L + CLIP-G.) The unconditional branch is the empty prompt's encoding. t5_length is diffusers'
max_sequence_length: 512 for FLUX.1-dev, 256 for FLUX.1-schnell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.models.config_fields import bounded, config_of


@dataclass
class FluxTextOptions:
    max_length: int = bounded(77, 1, 4096)  # CLIP's tokens
    joint_dim: int = bounded(4096, 1, 16384)  # T5's width (the context width)
    t5_length: int = bounded(512, 1, 4096)
    frozen: bool = True


class FluxTextEncoder(nn.Module):
    """Prompts -> ``{"crossattn": (B, t5_length, joint_dim), "vector": (B, CLIP width)}``."""

    context_cacheable = False  # encoded live (a dict context)
    zero_uncond = False

    def __init__(self, clip, clip_tokenizer, t5=None, t5_tokenizer=None, *args: Any, **arguments: Any):
        super().__init__()
        o = config_of(FluxTextOptions, args, arguments)
        if t5 is not None and t5.config.d_model != o.joint_dim:
            raise ValueError(f"FluxTextEncoder: T5's width {t5.config.d_model} is not joint_dim={o.joint_dim}")
        self.model, self.tokenizer, self.t5, self.t5_tokenizer = clip, clip_tokenizer, t5, t5_tokenizer
        self.max_length, self.joint_dim, self.t5_length, self.frozen = o.max_length, o.joint_dim, o.t5_length, o.frozen
        self.max_chunks = 1
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    @classmethod
    def from_pretrained(cls, path_or_hub_id, use_t5: bool = True, **options) -> "FluxTextEncoder":
        """``tokenizer/`` + ``text_encoder/`` (CLIP-L) and ``tokenizer_2/`` + ``text_encoder_2/`` (T5, optional) of a
        diffusers Flux folder; the CLIP and T5 configs bounded before anything is built."""
        from transformers import CLIPTextModel, CLIPTokenizer

        from ldm.models.clip_bounds import bounded_t5_config, bounded_text_config

        path = str(path_or_hub_id)
        clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                             config=bounded_text_config(path, "text_encoder", CLIPTextModel))
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        t5 = t5_tokenizer = None
        if use_t5 and (not Path(path).exists() or (Path(path) / "text_encoder_2").is_dir()):
            from transformers import AutoTokenizer, T5EncoderModel

            t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2",
                                                config=bounded_t5_config(path, "text_encoder_2"))
            t5_tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        return cls(clip, tokenizer, t5, t5_tokenizer, **options)

    @property
    def config(self) -> dict:
        return {"max_length": self.max_length, "joint_dim": self.joint_dim, "t5_length": self.t5_length,
                "kind": "flux"}

    @property
    def context_dim(self) -> int:
        return self.joint_dim

    @property
    def pooled_dim(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True):
        return super().train(False if self.frozen else mode)

    def forward(self, prompts) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = next(self.model.parameters()).device
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids.to(device)
            pooled = self.model(ids, output_hidden_states=False).pooler_output
            if self.t5 is None:
                tokens = pooled.new_zeros(len(prompts), self.t5_length, self.joint_dim)
            else:
                ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                                        return_tensors="pt").input_ids.to(device)
                tokens = self.t5(ids, output_hidden_states=False)[0].to(pooled.dtype)
        return {"crossattn": tokens, "vector": pooled}

    def drop_t5(self) -> None:
        """Sample without the T5 (sample.py t5=false): its tokens are zeros; the memory it held is freed."""
        self.t5 = self.t5_tokenizer = None

    def empty_context(self, batch_size: int = 1, chunks: int = 1) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            empty = self([""])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in empty.items()}
