"""Frozen CLIP text encoder (transformers' ``CLIPTextModel`` + ``CLIPTokenizer``).

SD1 uses CLIP ViT-L/14's last hidden state; SD2 uses OpenCLIP ViT-H's
penultimate layer followed by the final LayerNorm. The diffusers SD2 text
encoder already has the last layer removed (23 of 24 layers), so it is run
with ``penultimate=False``; ``penultimate=True`` is for full-depth models.

Prompts longer than 75 tokens (``max_chunks`` > 1), as A1111 (``modules/sd_hijack_clip.py``,
``FrozenCLIPEmbedderWithCustomWordsBase``) and ComfyUI (``comfy/sd1_clip.py``) do: the prompt's tokens are cut into
chunks of ``max_length - 2`` = 75, each chunk is wrapped in BOS ... EOS and padded to 77 with the tokenizer's pad
token (EOS for SD1, "!" = 0 for SD2: A1111's ``id_pad`` after the first EOS), every chunk is encoded on its own and
the contexts are concatenated along the sequence: ``(B, 77 * chunks, D)``. Prompts of a batch with fewer chunks
are padded with empty chunks (BOS EOS pad...), whose encoding is that of the empty prompt "": A1111's
``empty_chunk()`` padding, and its CFG padding of the unconditional context (``pad_cond`` with the empty prompt's
encoding). ComfyUI instead repeats the shorter context; A1111 is followed here. A1111's comma backtracking (a
chunk may end at a comma up to 20 tokens early) and its emphasis weights are not done. Tokens beyond
``max_chunks * 75`` are cut, with a warning naming ``model.text_encoder.max_chunks``.
"""

from __future__ import annotations

import logging
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
from torch import nn

from ldm.models import tiny_clip
from ldm.models.config_fields import bounded, config_of, split_config

HUB_PREFIX = "text_model."
log = logging.getLogger("ldm.models")


def clip_text_config(name: str):
    """``CLIPTextConfig`` for a preset: ``sd15``, ``sd21``, ``tiny`` or ``small``."""
    from transformers import CLIPTextConfig

    if name in ("sd15", "sd1"):
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
            hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    if name in ("sd21", "sd2"):
        # OpenCLIP ViT-H/14 text tower without its last (24th) block; gelu.
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=512,
            num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
            hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
        )
    if name in tiny_clip.PRESETS:
        vocab, _ = tiny_clip.build_vocab(tiny_clip.DEFAULT_WORDS)
        return tiny_clip.tiny_clip_config(
            len(vocab), vocab[tiny_clip.BOS], vocab[tiny_clip.EOS], **tiny_clip.PRESETS[name]
        )
    raise ValueError(f"unknown text encoder preset {name!r}; expected sd15, sd21, tiny or small")


def to_hub_keys(state_dict: dict) -> dict:
    """Keys as stored in hub ``model.safetensors`` files (``text_model.`` prefix)."""
    return {
        (k if k.startswith(HUB_PREFIX) else HUB_PREFIX + k): v
        for k, v in state_dict.items()
        if not k.endswith("position_ids")
    }


def to_module_keys(state_dict: dict, model: nn.Module) -> dict:
    """Match the ``text_model.`` prefix to ``model``'s own state-dict keys.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level);
    older versions keep it. ``position_ids`` buffers are dropped.
    """
    hub = to_hub_keys(state_dict)
    if any(k.startswith(HUB_PREFIX) for k in model.state_dict()):
        return hub
    return {k[len(HUB_PREFIX):]: v for k, v in hub.items()}


def expand_placeholders(prompt: str, tokenizer) -> str:
    """A multi-vector textual-inversion token ``<tok>`` in the prompt becomes ``<tok> <tok>_1 ... <tok>_{n-1}``
    (diffusers ``loaders/textual_inversion.py`` ``_maybe_convert_prompt``, the same string replacement)."""
    added = tokenizer.added_tokens_encoder
    if not any(f"{t}_1" in added for t in added):
        return prompt  # no multi-vector token: nothing to expand (and no second tokenization)
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt


def padding_chunks(tokens: int, length: int, max_length: int) -> int:
    """How many empty-prompt chunks pad a context of ``tokens`` to ``length`` tokens (A1111's CFG padding); an
    error when ``length`` is not ``tokens`` plus whole chunks of ``max_length``."""
    missing = length - tokens
    if missing < 0 or missing % max_length:
        raise ValueError(f"cannot pad a context of {tokens} tokens to {length}: contexts are whole "
                         f"chunks of {max_length} tokens")
    return missing // max_length


@contextmanager
def tiny_clip_folder(folder, prefix: str):
    """Where a tiny CLIP is written and read: ``folder`` as given (a cache the user chose, kept), else a temporary
    folder removed as soon as the encoder is loaded. Nothing reads it later (the tokenizer's vocabulary and the
    weights are in memory; exports write them from memory), so loading a checkpoint leaves no ``tiny_clip_*``
    folder behind in the temp directory."""
    if folder is not None:
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as temporary:
        yield Path(temporary)


def chunk_token_ids(tokenizer, prompts, max_length: int, max_chunks: int, min_chunks: int = 1) -> torch.Tensor:
    """``(B, chunks, max_length)`` token ids of long prompts (A1111 / ComfyUI, see the module docstring): each
    prompt's tokens in chunks of ``max_length - 2``, each BOS + tokens + EOS + pad; shorter prompts padded with
    empty chunks (BOS EOS pad...); chunks = the longest prompt's (at least ``min_chunks``, at most max_chunks)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tok, body = tokenizer, max_length - 2
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = eos if tok.pad_token_id is None else tok.pad_token_id
    rows = []
    for prompt in prompts:
        prompt = expand_placeholders(prompt, tok)  # multi-vector textual-inversion tokens, as tokenize()
        ids = tok(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids
        if len(ids) > max_chunks * body:
            log.warning("prompt of %d tokens cut to %d (model.text_encoder.max_chunks=%d chunks of %d; raise it "
                        "for longer prompts): %.60r...", len(ids), max_chunks * body, max_chunks, body, prompt)
            ids = ids[:max_chunks * body]
        pieces = [ids[i:i + body] for i in range(0, len(ids), body)] or [[]]
        rows.append([[bos] + p + [eos] + [pad] * (body - len(p)) for p in pieces])
    empty = [bos, eos] + [pad] * body
    chunks = max(min_chunks, *(len(r) for r in rows))
    return torch.tensor([r + [empty] * (chunks - len(r)) for r in rows], dtype=torch.long)


@dataclass
class TextEncoderOptions:
    """How a CLIP text encoder is used (its sizes and weights come with its folder). The bounds are what a stored
    config may ask for (ldm.formats.safe_build)."""

    penultimate: bool = False  # the context is the penultimate layer's output (SD 2.x), not the last (SD 1.x)
    max_length: int = bounded(77, 1, 4096)  # tokens per chunk, BOS and EOS included
    frozen: bool = True  # False: its weights train with the U-Net, and no context is cached
    cache_size: int = bounded(0, 0, 1_000_000)  # contexts memoised per prompt string (frozen encoders)
    max_chunks: int = bounded(1, 1, 64)  # prompts of up to 75 x max_chunks tokens (A1111 long prompts)

    def __post_init__(self):
        if int(self.max_chunks) < 1:
            raise ValueError(f"CLIPTextEncoder: model.text_encoder.max_chunks must be >= 1, got {self.max_chunks!r}")
        if int(self.cache_size) < 0:
            raise ValueError(f"CLIPTextEncoder: cache_size must be >= 0, got {self.cache_size!r}")
        self.max_chunks, self.cache_size = int(self.max_chunks), int(self.cache_size)


@dataclass
class TinyCLIPConfig:
    """A local random tiny CLIP, written on first use (no downloads): same seed and words -> same weights."""

    preset: str = "tiny"  # a key of ldm.models.tiny_clip.PRESETS (its width and depth)
    folder: str | None = None  # where it is kept (None: built in a temporary folder, removed once loaded)
    seed: int = bounded(0, 0, 2**63 - 1)
    words: tuple[str, ...] = tiny_clip.DEFAULT_WORDS  # its vocabulary (model.text_encoder.words=captions: the data's)

    def __post_init__(self):
        if isinstance(self.words, str):
            raise ValueError(f"model.text_encoder.words={self.words!r}: expected a list of words ('captions' is "
                             "replaced by train() with the words of data.train's captions)")
        self.words = tuple(self.words)
        if self.preset not in tiny_clip.PRESETS:
            raise ValueError(f"unknown tiny text encoder preset {self.preset!r}; expected one of "
                             f"{sorted(tiny_clip.PRESETS)}")


@dataclass
class CLIPFolder:
    """A CLIP text encoder's folder: ``tokenizer/`` + ``text_encoder/`` (subfolder_layout) or both in one."""

    path_or_hub_id: str
    subfolder_layout: bool = True


class CLIPTextEncoder(nn.Module):
    """Prompts -> cross-attention context ``(B, max_length * chunks, D)``; frozen by default. ``frozen=False``: its
    weights train with the U-Net (from scratch there is nothing to preserve), and no context is cached.

    max_chunks: 1 (default) encodes 77 tokens exactly as before (longer prompts cut); N > 1 encodes up to N chunks
    of 75 tokens (A1111 / ComfyUI long prompts, see the module docstring), e.g. 3 -> 225 tokens."""

    # the TextEncoder protocol (ldm.models.protocols): one CLIP's context, no pooled vector, "" as unconditional
    context_cacheable = True
    zero_uncond = False
    pooled_dim = None

    def __init__(self, model, tokenizer, *args: Any, **arguments: Any):
        """``model``: a transformers CLIPTextModel; ``options`` (or its fields as keywords): how it is used."""
        super().__init__()
        o = config_of(TextEncoderOptions, args, arguments)
        self.model = model
        self.tokenizer = tokenizer
        self.penultimate, self.max_length, self.frozen = o.penultimate, o.max_length, o.frozen
        self.max_chunks, self.cache_size = o.max_chunks, o.cache_size
        self._empty: dict = {}
        self._contexts: OrderedDict = OrderedDict()  # (prompt, device, dtype) -> (L, D), least recent first
        self.model.register_load_state_dict_post_hook(self._clear_cache)
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    @classmethod
    def from_pretrained(cls, path_or_hub_id, subfolder_layout: bool = True, **options) -> "CLIPTextEncoder":
        """Load ``tokenizer/`` + ``text_encoder/`` of a hub-like folder or hub id."""
        from transformers import CLIPTextModel, CLIPTokenizer

        from ldm.models.clip_bounds import bounded_text_config

        path = str(path_or_hub_id)
        sub = ("tokenizer", "text_encoder") if subfolder_layout else ("", "")
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder=sub[0])
        config = bounded_text_config(path, sub[1], CLIPTextModel)  # sizes bounded before transformers allocates
        model = CLIPTextModel.from_pretrained(path, subfolder=sub[1], config=config)
        max_length = min(model.config.max_position_embeddings, tokenizer.model_max_length)
        return cls(model, tokenizer, **{"max_length": max_length, **options})

    @classmethod
    def from_tiny(cls, *args: Any, **arguments: Any) -> "CLIPTextEncoder":
        """Write (if needed) and load a local random tiny CLIP (a ``TinyCLIPConfig``, or its preset's name, or its
        fields as keywords; the other keywords are ``TextEncoderOptions``); no downloads. A folder that already
        holds one must hold this one (the vocabulary of ``words``, the preset's width): a stale folder is an error,
        not reused."""
        config, options = split_config(TinyCLIPConfig, args, arguments)
        preset, words, seed = config.preset, config.words, config.seed
        with tiny_clip_folder(config.folder, "tiny_clip_") as folder:
            if not (folder / "text_encoder" / "model.safetensors").exists():
                tiny_clip.write_tiny_clip(folder, words=words, seed=seed, **tiny_clip.PRESETS[preset])
            encoder = cls.from_pretrained(folder, **options)
        vocab, _ = tiny_clip.build_vocab(words)
        if encoder.tokenizer.get_vocab() != vocab or encoder.context_dim != tiny_clip.PRESETS[preset]["hidden_size"]:
            raise ValueError(f"model.text_encoder.folder: {folder} holds a tiny CLIP of other words or another width "
                             f"than preset={preset!r} with these words; delete it or point folder elsewhere")
        return encoder

    def _clear_cache(self, *_):
        """New weights -> the cached contexts are stale."""
        self._empty.clear()
        self._contexts.clear()

    @staticmethod
    def cache_rows(context: torch.Tensor) -> torch.Tensor:
        """The context as the latent cache stores it: already one (B, L, D) tensor."""
        return context

    @staticmethod
    def from_cache_rows(rows: torch.Tensor) -> torch.Tensor:
        return rows

    @property
    def context_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def config(self) -> dict:
        return {"penultimate": self.penultimate, "max_length": self.max_length,
                "context_dim": self.context_dim, "max_chunks": self.max_chunks}

    def train(self, mode: bool = True):
        """A frozen encoder stays in eval mode."""
        return super().train(False if self.frozen else mode)

    def tokenize(self, prompts) -> torch.Tensor:
        """``(B, max_length)`` token ids, padded / truncated (EOS kept)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [expand_placeholders(p, self.tokenizer) for p in prompts]
        out = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        return out.input_ids

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> context."""
        device = next(self.model.parameters()).device
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            out = self.model(ids.to(device), output_hidden_states=self.penultimate)
            if not self.penultimate:
                return out.last_hidden_state
            return self.model.final_layer_norm(out.hidden_states[-2])

    def chunk_ids(self, prompts) -> torch.Tensor:
        """``(B, chunks, max_length)`` token ids of ``max_chunks`` > 1 (:func:`chunk_token_ids`)."""
        return chunk_token_ids(self.tokenizer, prompts, self.max_length, self.max_chunks)

    def encode_chunks(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, chunks, L)`` ids -> ``(B, chunks * L, D)``: every chunk encoded on its own, then concatenated."""
        b, n, length = ids.shape
        context = self.encode_ids(ids.reshape(b * n, length))
        return context.reshape(b, n * context.shape[1], context.shape[2])

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if self.max_chunks == 1:
            return self.encode_ids(self.tokenize(prompts))
        return self.encode_chunks(self.chunk_ids(prompts))

    def forward(self, prompts) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.cache_size and self.frozen:
            return self._cached(list(prompts))
        return self.encode(list(prompts))

    def pad_context(self, context: torch.Tensor, length: int) -> torch.Tensor:
        """``context`` (B, L, D) padded to ``length`` tokens with empty-prompt chunks (A1111's CFG padding)."""
        chunks = padding_chunks(context.shape[1], length, self.max_length)
        if chunks == 0:
            return context
        return torch.cat([context, self.empty_context(context.shape[0], chunks).to(context)], dim=1)

    def _cached(self, prompts: list[str]) -> torch.Tensor:
        """Contexts of a frozen encoder, memoised per prompt (least recently used out first): data whose captions
        repeat (the synthetic shapes have 54) skips the encoder. A new prompt is encoded on its own, so its
        context never depends on its batch-mates and a resumed run sees the same numbers."""
        p = next(self.model.parameters())
        contexts = []
        for prompt in prompts:
            key = (prompt, p.device, p.dtype)
            if key in self._contexts:
                self._contexts.move_to_end(key)
            else:
                with torch.no_grad():
                    self._contexts[key] = self.encode([prompt])[0].detach()
                if len(self._contexts) > self.cache_size:
                    self._contexts.popitem(last=False)
            contexts.append(self._contexts[key])
        length = max(c.shape[0] for c in contexts)  # long prompts: pad to the longest with empty chunks
        return torch.cat([self.pad_context(c[None], length) for c in contexts])

    def empty_context(self, batch_size: int = 1, chunks: int = 1) -> torch.Tensor:
        """Context of the empty prompt ``""`` (CFG / conditioning dropout), cached; ``chunks`` copies of its one
        chunk along the sequence (the empty prompt padded to a long prompt's length). Not cached when the weights
        train (or an adapter does): a stored context would go stale."""
        if not self.frozen:
            empty = self.encode_ids(self.tokenize([""]))
            return (empty.repeat(1, int(chunks), 1) if chunks > 1 else empty).expand(batch_size, -1, -1)
        p = next(self.model.parameters())
        key = (p.device, p.dtype)
        if key not in self._empty:
            with torch.no_grad():
                self._empty[key] = self.encode_ids(self.tokenize([""])).detach()
        empty = self._empty[key]
        if chunks > 1:
            empty = empty.repeat(1, int(chunks), 1)
        return empty.expand(batch_size, -1, -1)

    def hub_state_dict(self) -> dict:
        """The weights with hub / diffusers ``text_encoder`` key names."""
        return to_hub_keys(self.model.state_dict())
