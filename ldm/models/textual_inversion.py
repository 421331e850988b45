"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): new placeholder tokens whose input
embeddings are the only trained weights; the text encoder and the U-Net stay frozen.

A placeholder with n vectors is the tokens ``<tok>, <tok>_1, ..., <tok>_{n-1}`` (the naming of diffusers'
``examples/textual_inversion/textual_inversion.py`` and ``loaders/textual_inversion.py``
``_extend_tokens_and_embeddings``), and a prompt's ``<tok>`` expands to all of them
(``ldm.models.text_encoder.expand_placeholders``, diffusers' ``maybe_convert_prompt``).

The trained vectors live in their own parameter (``PlaceholderEmbedding.vectors``) and are spliced into the
token-embedding output by a forward hook, so the encoder's embedding matrix is never in the optimizer: every
other row stays bit-identical (no weight decay, no stray gradient). ``write_rows`` copies them into the matrix
for sampling and export, where the plain lookup then gives the same output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


@dataclass
class TextualInversionConfig:
    """configs/adapter/textual_inversion.yaml: one placeholder token, trained from an init token's embedding."""

    placeholder_token: str = "<concept>"
    num_vectors: int = 1  # tokens <tok>, <tok>_1, ... (diffusers' --num_vectors)
    init_token: str = "shape"  # a word of the vocabulary that is ONE token: every vector starts at its embedding
    lr: Optional[float] = None  # null: optim.lr

    def __post_init__(self):
        token = str(self.placeholder_token)
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise ValueError(f"adapter.placeholder_token must be one word without spaces, got {token!r}")
        if int(self.num_vectors) < 1:
            raise ValueError(f"adapter.num_vectors must be >= 1, got {self.num_vectors!r}")
        if self.lr is not None and not float(self.lr) > 0:
            raise ValueError(f"adapter.lr must be > 0 (or null: optim.lr), got {self.lr!r}")
        self.num_vectors = int(self.num_vectors)


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """``<tok>, <tok>_1, ..., <tok>_{n-1}`` (diffusers' multi-vector naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def token_embedding(encoder) -> nn.Embedding:
    """The input-embedding table of a ``CLIPTextEncoder`` (transformers ``get_input_embeddings``)."""
    return encoder.model.get_input_embeddings()


def single_token_id(encoder, word: str, key: str = "adapter.init_token") -> int:
    """The id of ``word``, which must tokenize to exactly one token; the error names ``key``."""
    ids = encoder.tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = encoder.tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{key}={word!r} is {len(ids)} tokens ({pieces}), not one: choose a single-token word")
    return int(ids[0])


END_OF_WORD = "</w>"  # CLIP's BPE marks a word's last piece: the vocabulary holds "red</w>", not "red"


def check_new_tokens(tokenizer, tokens: list[str]) -> None:
    """New tokens must not take over text a prompt already means: a token with spaces, or one that (lower-cased,
    as CLIP reads prompts) is a vocabulary entry with or without the end-of-word mark, would silently replace that
    word in every prompt (a downloaded embedding named ``red``)."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"token {token!r} must be one word without spaces")
        word = next((w for w in (token.lower() + END_OF_WORD, token.lower()) if w in vocab and w != token), None)
        if word is not None:
            raise ValueError(f"token {token!r} is the word {word!r} of the tokenizer's vocabulary: it would change "
                             "the meaning of every prompt that uses the word; choose a new name (e.g. "
                             f"'<{token}>')")
        if token in vocab:
            raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary: choose another name")


@torch.no_grad()
def add_token_rows(encoder, tokens: list[str], vectors: Tensor) -> list[int]:
    """Add ``tokens`` to the tokenizer and one embedding row each (``vectors`` [n, dim]) to the text model,
    as diffusers' ``load_textual_inversion`` does (resize, then ``tokenizer.add_tokens`` in order). Returns the
    new ids. The old rows are copied, never re-initialised (no random draws: a run's streams stay as they are)."""
    table = token_embedding(encoder)
    if vectors.ndim != 2 or vectors.shape[0] != len(tokens):
        raise ValueError(f"need one vector per token: {len(tokens)} tokens, vectors of shape {tuple(vectors.shape)}")
    if vectors.shape[1] != table.embedding_dim:
        raise ValueError(f"embedding vectors have {vectors.shape[1]} dims; the text encoder's are "
                         f"{table.embedding_dim}")
    check_new_tokens(encoder.tokenizer, tokens)
    if len(encoder.tokenizer) != table.num_embeddings:
        raise ValueError(f"tokenizer ({len(encoder.tokenizer)} tokens) and text encoder ({table.num_embeddings} "
                         "embedding rows) disagree: cannot add tokens")
    weight = torch.cat([table.weight.detach(), vectors.to(table.weight)])
    new_table = nn.Embedding.from_pretrained(weight, freeze=not table.weight.requires_grad)
    encoder.model.set_input_embeddings(new_table)
    encoder.model.config.vocab_size = weight.shape[0]  # as resize_token_embeddings records it
    encoder.tokenizer.add_tokens(list(tokens))
    ids = encoder.tokenizer.convert_tokens_to_ids(list(tokens))
    first = table.num_embeddings
    if ids != list(range(first, first + len(tokens))):
        raise ValueError(f"the tokenizer gave the new tokens ids {ids}, expected {first}..{first + len(tokens) - 1}")
    encoder._clear_cache()  # a cached prompt with the token was encoded before it existed
    return ids


class PlaceholderEmbedding(nn.Module):
    """The trained vectors ``[n, dim]`` of one placeholder whose token ids are ``first_id .. first_id + n - 1``."""

    def __init__(self, token: str, vectors: Tensor, first_id: int):
        super().__init__()
        self.token = token
        self.first_id = int(first_id)
        self.vectors = nn.Parameter(vectors.detach().clone().float())

    @property
    def tokens(self) -> list[str]:
        return placeholder_tokens(self.token, self.vectors.shape[0])

    @classmethod
    def build(cls, encoder, config: TextualInversionConfig) -> "PlaceholderEmbedding":
        """Add the placeholder tokens to ``encoder``, each row starting at ``config.init_token``'s embedding."""
        init_id = single_token_id(encoder, config.init_token)
        if len(encoder.tokenizer(config.placeholder_token, add_special_tokens=False).input_ids) == 1:
            raise ValueError(f"adapter.placeholder_token={config.placeholder_token!r} is already a token of the "
                             "vocabulary: its prompts would change meaning; choose a new word (e.g. '<my-concept>')")
        init = token_embedding(encoder).weight[init_id].detach().float()
        vectors = init.unsqueeze(0).repeat(config.num_vectors, 1)
        try:
            ids = add_token_rows(encoder, placeholder_tokens(config.placeholder_token, config.num_vectors), vectors)
        except ValueError as e:
            raise ValueError(f"adapter.placeholder_token: {e}") from e
        return cls(config.placeholder_token, vectors, ids[0])

    def splice(self, ids: Tensor, embeds: Tensor) -> Tensor:
        """``embeds`` (B, L, D) of ``ids`` with the placeholder positions taken from ``vectors`` (differentiable)."""
        offset = ids - self.first_id
        mine = (offset >= 0) & (offset < self.vectors.shape[0])
        picked = self.vectors.to(embeds.dtype)[offset.clamp(0, self.vectors.shape[0] - 1)]
        return torch.where(mine.unsqueeze(-1), picked, embeds)

    def attach(self, encoder):
        """Splice ``vectors`` into ``encoder``'s token-embedding output; returns the hook handle (``.remove()``)."""
        return token_embedding(encoder).register_forward_hook(lambda _m, args, out: self.splice(args[0], out))

    @torch.no_grad()
    def write_rows(self, encoder) -> None:
        """Copy ``vectors`` into ``encoder``'s embedding rows of the placeholder tokens."""
        weight = token_embedding(encoder).weight
        weight[self.first_id:self.first_id + self.vectors.shape[0]] = self.vectors.to(weight)
        encoder._clear_cache()
