"""SDXL's two frozen text encoders (Podell et al. 2023, sec. 2.1): CLIP ViT-L and OpenCLIP ViT-bigG.

What SDXL feeds the U-Net (diffusers ``StableDiffusionXLPipeline.encode_prompt``; SGM ``sd_xl_base.yaml``:
``FrozenCLIPEmbedder(layer="hidden", layer_idx=11)`` + ``FrozenOpenCLIPEmbedder2(layer="penultimate",
always_return_pooled=True, legacy=False)``):
- context (B, 77, 768 + 1280): both encoders' penultimate hidden states (``hidden_states[-2]``, no final
  LayerNorm), concatenated along the feature axis, ViT-L first;
- pooled (B, 1280): bigG's ``text_embeds``: the final layer's (final-LayerNorm'ed) EOS token through
  ``text_projection`` (``CLIPTextModelWithProjection``).
The unconditional branch is all zeros (SGM ucg on the text embedders zeroes their outputs; diffusers
``force_zeros_for_empty_prompt=True`` for SDXL base), unless ``zero_uncond=False`` (the empty prompt's encoding).

Long prompts (``max_chunks`` > 1): both tokenizers' ids are cut into the same 75-token chunks as the single CLIP's
(``text_encoder.chunk_token_ids``: BOS + tokens + EOS + each tokenizer's pad), every chunk is encoded on its own by
both encoders, the contexts are concatenated along the sequence ``(B, 77 * chunks, D1 + D2)``, and the pooled
embedding is the first chunk's (ComfyUI ``comfy/sd1_clip.py`` ``encode_token_weights``: ``first_pooled``; A1111
``sd_hijack_clip.py`` returns ``zs[0].pooled``). A batch is padded to its longest prompt with empty chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ldm.models import tiny_clip
from ldm.models.config_fields import bounded, config_of, split_config
from ldm.models.context_rows import pack_rows, unpack_rows
from ldm.models.text_encoder import chunk_token_ids, padding_chunks, tiny_clip_folder, to_hub_keys

SUBFOLDERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def sdxl_text_configs(name: str = "sdxl"):
    """(``CLIPTextConfig`` of ViT-L, of bigG) of SDXL base (the ``text_encoder/`` and ``text_encoder_2/``
    config.json of stabilityai/stable-diffusion-xl-base-1.0)."""
    from transformers import CLIPTextConfig

    if name != "sdxl":
        raise ValueError(f"unknown SDXL text encoder preset {name!r}; expected sdxl")
    vit_l = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    big_g = CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return vit_l, big_g


@dataclass
class DualTextOptions:
    """How SDXL's pair of text encoders is used. The bounds are what a stored config may ask for."""

    max_length: int = bounded(77, 1, 4096)
    frozen: bool = True
    zero_uncond: bool = True  # a dropped / empty prompt is the zero context (SGM, diffusers force_zeros_...)
    max_chunks: int = bounded(1, 1, 64)

    def __post_init__(self):
        if int(self.max_chunks) < 1:
            raise ValueError(f"DualCLIPTextEncoder: model.text_encoder.max_chunks must be >= 1, got "
                             f"{self.max_chunks!r}")
        self.max_length, self.max_chunks, self.zero_uncond = int(self.max_length), int(self.max_chunks), \
            bool(self.zero_uncond)


@dataclass
class TinyDualCLIPConfig:
    """A local random pair of tiny CLIPs laid out like an SDXL folder (no downloads)."""

    folder: str | None = None
    seed: int = bounded(0, 0, 2**63 - 1)
    words: tuple[str, ...] = tiny_clip.DEFAULT_WORDS
    hidden_size: int = bounded(32, 1, 1024)
    hidden_size_2: int = bounded(48, 1, 1024)
    projection_dim: int = bounded(16, 1, 1024)

    def __post_init__(self):
        self.words = tuple(self.words)


class DualCLIPTextEncoder(nn.Module):
    """Prompts -> ``{"crossattn": (B, L, D1 + D2), "pooled": (B, P)}``; frozen by default.

    ``model_1``: transformers ``CLIPTextModel`` (ViT-L); ``model_2``: ``CLIPTextModelWithProjection`` (bigG).
    """

    context_cacheable = False  # the latent cache stores one (L, D) context per caption: SDXL's pair is encoded live

    def __init__(self, model_1, tokenizer_1, model_2, tokenizer_2, *args: Any, **arguments: Any):
        """``model_1`` / ``model_2``: transformers CLIPTextModel / CLIPTextModelWithProjection; ``options`` (or its
        fields as keywords): how the pair is used."""
        super().__init__()
        o = config_of(DualTextOptions, args, arguments)
        self.max_chunks = o.max_chunks
        if not hasattr(model_2, "text_projection"):
            raise ValueError("DualCLIPTextEncoder: the second encoder must be a CLIPTextModelWithProjection "
                             "(SDXL's pooled embedding is its text_projection output)")
        self.model = model_1
        self.model_2 = model_2
        self.tokenizer, self.tokenizer_2 = tokenizer_1, tokenizer_2
        self.max_length, self.frozen, self.zero_uncond = o.max_length, o.frozen, o.zero_uncond
        self._empty: dict = {}
        for model in (model_1, model_2):
            model.register_load_state_dict_post_hook(self._clear_cache)  # new weights: the cached "" is stale
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    @classmethod
    def from_pretrained(cls, path_or_hub_id, **options) -> "DualCLIPTextEncoder":
        """``tokenizer/``, ``text_encoder/``, ``tokenizer_2/``, ``text_encoder_2/`` of a diffusers SDXL folder."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = str(path_or_hub_id)
        tok_1 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        tok_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        from ldm.models.clip_bounds import bounded_text_config

        model_1 = CLIPTextModel.from_pretrained(  # sizes bounded before transformers allocates
            path, subfolder="text_encoder", config=bounded_text_config(path, "text_encoder", CLIPTextModel))
        model_2 = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2",
            config=bounded_text_config(path, "text_encoder_2", CLIPTextModelWithProjection))
        max_length = min(model_1.config.max_position_embeddings, tok_1.model_max_length)
        return cls(model_1, tok_1, model_2, tok_2, **{"max_length": max_length, **options})

    @classmethod
    def from_tiny(cls, *args: Any, **arguments: Any) -> "DualCLIPTextEncoder":
        """Write (if needed) and load a local random pair of tiny CLIPs laid out like an SDXL folder (a
        ``TinyDualCLIPConfig`` or its fields as keywords; the other keywords are ``DualTextOptions``)."""
        config, options = split_config(TinyDualCLIPConfig, args, arguments)
        with tiny_clip_folder(config.folder, "tiny_sdxl_clip_") as folder:
            if not (folder / "text_encoder_2" / "model.safetensors").exists():
                tiny_clip.write_tiny_sdxl_clips(folder, words=config.words, seed=config.seed,
                                                hidden_size=config.hidden_size, hidden_size_2=config.hidden_size_2,
                                                projection_dim=config.projection_dim)
            return cls.from_pretrained(folder, **options)

    # --------------------------------------------------------------------------------------------- properties
    @property
    def context_dim(self) -> int:
        return self.model.config.hidden_size + self.model_2.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.model_2.config.projection_dim

    @property
    def config(self) -> dict:
        return {"max_length": self.max_length, "context_dim": self.context_dim, "pooled_dim": self.pooled_dim,
                "zero_uncond": self.zero_uncond, "max_chunks": self.max_chunks, "kind": "sdxl"}

    def train(self, mode: bool = True):
        """A frozen encoder stays in eval mode."""
        return super().train(False if self.frozen else mode)

    def _clear_cache(self, *_):
        self._empty.clear()

    # ------------------------------------------------------------------------------------------------ encoding
    def tokenize(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, max_length)`` of each tokenizer (bigG's pads with ``!``, ViT-L's with EOS)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return tuple(tok(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt").input_ids for tok in (self.tokenizer, self.tokenizer_2))

    def encode_ids(self, ids_1: torch.Tensor, ids_2: torch.Tensor) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            out_1 = self.model(ids_1.to(device), output_hidden_states=True)
            out_2 = self.model_2(ids_2.to(device), output_hidden_states=True)
            context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
            return {"crossattn": context, "pooled": out_2.text_embeds}  # pooled: (B, P)

    def chunk_ids(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, chunks, max_length)`` ids of each tokenizer, the same number of chunks for both."""
        ids = [chunk_token_ids(tok, prompts, self.max_length, self.max_chunks)
               for tok in (self.tokenizer, self.tokenizer_2)]
        chunks = max(i.shape[1] for i in ids)
        return tuple(chunk_token_ids(tok, prompts, self.max_length, self.max_chunks, min_chunks=chunks)
                     if i.shape[1] < chunks else i for tok, i in zip((self.tokenizer, self.tokenizer_2), ids))

    def encode_chunks(self, ids_1: torch.Tensor, ids_2: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, chunks, L)`` ids -> crossattn ``(B, chunks * L, D1 + D2)`` (each chunk encoded on its own) and the
        first chunk's pooled ``(B, P)``."""
        b, n, length = ids_1.shape
        out = self.encode_ids(ids_1.reshape(b * n, length), ids_2.reshape(b * n, length))
        context = out["crossattn"].reshape(b, n * length, -1)
        return {"crossattn": context, "pooled": out["pooled"].reshape(b, n, -1)[:, 0]}

    def forward(self, prompts) -> dict[str, torch.Tensor]:
        if self.max_chunks == 1:
            return self.encode_ids(*self.tokenize(prompts))
        return self.encode_chunks(*self.chunk_ids(prompts))

    def cache_rows(self, context: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pair as one (B, L + 1, D) tensor, the pooled vector last (ldm.models.context_rows)."""
        return pack_rows(context["crossattn"], context["pooled"])

    def from_cache_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, pooled = unpack_rows(rows, self.pooled_dim)
        return {"crossattn": tokens, "pooled": pooled}

    def _empty_prompt(self) -> dict[str, torch.Tensor]:
        """The empty prompt's one-chunk encoding, cached per device / dtype."""
        p = next(self.model.parameters())
        key = (p.device, p.dtype)
        if key not in self._empty:
            with torch.no_grad():
                self._empty[key] = {k: v.detach() for k, v in self.encode_ids(*self.tokenize([""])).items()}
        return self._empty[key]

    def empty_context(self, batch_size: int = 1, chunks: int = 1) -> dict[str, torch.Tensor]:
        """The unconditional conditioning: zeros (SDXL), or the empty prompt's encoding (zero_uncond=False);
        ``chunks`` x 77 tokens long (a long prompt's length)."""
        empty = {k: torch.zeros_like(v) if self.zero_uncond else v for k, v in self._empty_prompt().items()}
        empty["crossattn"] = empty["crossattn"].repeat(1, int(chunks), 1)
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in empty.items()}

    def pad_context(self, context: dict, length: int) -> dict:
        """``context["crossattn"]`` padded to ``length`` tokens with the empty prompt's chunks (as a batch pads a
        shorter prompt; A1111's CFG padding); the other entries (pooled, vector) unchanged."""
        crossattn = context["crossattn"]
        chunks = padding_chunks(crossattn.shape[1], length, self.max_length)
        if chunks == 0:
            return context
        pad = self._empty_prompt()["crossattn"].to(crossattn).repeat(1, chunks, 1)
        return {**context, "crossattn": torch.cat([crossattn, pad.expand(crossattn.shape[0], -1, -1)], dim=1)}

    def hub_state_dicts(self) -> tuple[dict, dict]:
        """The weights with the hub / diffusers ``text_encoder`` and ``text_encoder_2`` key names."""
        return to_hub_keys(self.model.state_dict()), _hub_keys_2(self.model_2.state_dict())


def _hub_keys_2(state_dict: dict) -> dict:
    """``CLIPTextModelWithProjection`` keys as stored on the hub: ``text_model.*`` + ``text_projection.weight``."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k] = v
    return out
