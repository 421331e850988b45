"""A tiny, local, seeded CLIP text encoder laid out like a hub repo.

``write_tiny_clip(folder)`` writes ``tokenizer/`` (a real byte-level BPE
vocab whose merges make the given words single tokens) and ``text_encoder/``
(a randomly initialised ``CLIPTextModel``). Nothing is downloaded; the same
arguments always give byte-identical files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words of the synthetic shapes captions ("a red circle on a white background").
DEFAULT_WORDS = (
    "a an the on of in with and at to is are",
    "red green blue yellow orange purple black white gray grey pink brown cyan magenta",
    "circle circles square squares triangle triangles rectangle star ellipse diamond cross",
    "shape shapes background small large big tiny medium left right top bottom center middle",
    "above below next one two three four photo picture image drawing",
)

# Model sizes of the local presets (see ``ldm.models.text_encoder.clip_text_config``).
PRESETS = {
    "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
    "small": {"hidden_size": 128, "num_layers": 4, "num_heads": 4},
}


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


_BYTE_CHARS = bytes_to_unicode()
_PIECE = re.compile(r"[^\W\d_]+|\d|[^\s\w]+|_+")


def word_symbols(piece: str) -> list[str]:
    """Initial BPE symbols of one pre-tokenized piece (last one ends with ``</w>``)."""
    chars = [_BYTE_CHARS[b] for b in piece.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return chars


def bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to a list of symbols."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(p, None), p) for p in zip(symbols, symbols[1:])]
        pairs = [(r, p) for r, p in pairs if r is not None]
        if not pairs:
            break
        _, (left, right) = min(pairs)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                merged.append(left + right)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocab(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocab + merges such that every word in ``words`` is one token."""
    pieces = []
    for text in words:
        for piece in _PIECE.findall(text.lower()):
            if piece not in pieces:
                pieces.append(piece)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for piece in pieces:
        while len(out := bpe(word_symbols(piece), ranks)) > 1:
            pair = (out[0], out[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    base = list(_BYTE_CHARS.values())
    tokens = base + [c + END_OF_WORD for c in base]
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def caption_words(captions, max_words: int = 8192, chunk_chars: int = 4000) -> list[str]:
    """The vocabulary words of ``captions`` for ``build_vocab``: every pre-tokenized piece (lower-cased, split like
    the tokenizer splits them), the ``max_words`` most frequent (ties: alphabetical), returned as space-joined chunks
    of at most ``chunk_chars`` characters (a stored config holds short lists of bounded strings). The same captions,
    in any order, always give the same list, so a resumed run and a sampling process rebuild the same tokenizer."""
    counts: dict[str, int] = {}
    for caption in captions:
        for piece in _PIECE.findall(str(caption).lower()):
            if len(piece) <= 64:  # longer runs are not words (hashes, URLs): bytes are enough for them
                counts[piece] = counts.get(piece, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))[:max_words]
    chunks, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > chunk_chars:
            chunks.append(line)
            line = ""
        line = f"{line} {word}" if line else word
    return chunks + ([line] if line else [])


def tiny_clip_config(vocab_size: int, bos_id: int, eos_id: int, hidden_size: int = 32,
                     num_layers: int = 2, num_heads: int = 2, max_length: int = 77):
    """``CLIPTextConfig`` of a small SD1-style (quick_gelu) text encoder."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        projection_dim=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        max_position_embeddings=max_length, hidden_act="quick_gelu",
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(folder, words=DEFAULT_WORDS, max_length: int = 77, pad_token: str = EOS) -> dict[str, int]:
    """Write ``vocab.json``, ``merges.txt`` and tokenizer configs into ``folder`` (SDXL's bigG tokenizer pads
    with ``!``, the others with EOS)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    _write_json(folder / "vocab.json", vocab)
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        **special, "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
        "do_lower_case": True, "add_prefix_space": False, "errors": "replace",
        "clean_up_tokenization_spaces": True,
    })
    return vocab


def write_tiny_clip(folder, words=DEFAULT_WORDS, hidden_size: int = 32, num_layers: int = 2,
                    num_heads: int = 2, seed: int = 0) -> Path:
    """Write a hub-like ``tokenizer/`` + ``text_encoder/`` folder; returns ``folder``."""
    from transformers import CLIPTextModel

    folder = Path(folder)
    vocab = write_tokenizer(folder / "tokenizer", words)
    config = tiny_clip_config(len(vocab), vocab[BOS], vocab[EOS], hidden_size, num_layers, num_heads)
    _write_model(folder / "text_encoder", CLIPTextModel, config, seed)
    return folder


def write_tiny_sdxl_clips(folder, words=DEFAULT_WORDS, hidden_size: int = 32, hidden_size_2: int = 48,
                          projection_dim: int = 16, num_layers: int = 2, num_heads: int = 2, seed: int = 0) -> Path:
    """An SDXL-like pair: ``tokenizer/`` + ``text_encoder/`` (a quick_gelu ``CLIPTextModel``, as ViT-L) and
    ``tokenizer_2/`` (pads with ``!``) + ``text_encoder_2/`` (a gelu ``CLIPTextModelWithProjection``, as bigG)."""
    from transformers import CLIPTextModelWithProjection

    folder = write_tiny_clip(folder, words, hidden_size, num_layers, num_heads, seed)
    vocab = write_tokenizer(folder / "tokenizer_2", words, pad_token="!")
    config = tiny_clip_config(len(vocab), vocab[BOS], vocab[EOS], hidden_size_2, num_layers, num_heads)
    config.hidden_act, config.projection_dim, config.pad_token_id = "gelu", projection_dim, vocab["!"]
    _write_model(folder / "text_encoder_2", CLIPTextModelWithProjection, config, seed + 1)
    return folder


def _write_model(out: Path, cls, config, seed: int) -> None:
    """A seeded random ``cls(config)`` as ``config.json`` + ``model.safetensors`` (hub key names)."""
    from ldm.file_modes import write_safetensors

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = [cls.__name__]
    _write_json(out / "config.json", config.to_dict())
    state = {}
    for key, value in model.state_dict().items():
        if not key.endswith("position_ids"):
            hub_key = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
            state[hub_key] = value.detach().contiguous().clone()
    write_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
