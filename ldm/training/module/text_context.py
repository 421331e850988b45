"""What a training step does to the text context besides encoding it:

- ``cached_context``: a batch from the latent cache: the stored rows (ldm.models.context_rows), the empty prompt's
  where the caption was dropped (a host-decided select, no read-back), back in the text encoder's form (SD3's
  {"crossattn", "vector"}; a single CLIP's tensor as it is).
- ``EncoderDropout``: SD3's per-encoder conditioning dropout (Esser et al. 2024: each of the three text encoders
  dropped independently, at 46.3%, so that any subset of them works at inference, T5 included):
  ``module.encoder_dropout`` = {clip_l: p, clip_g: p, t5: p}. Each row of a batch drops each encoder with its own
  probability, independently of the others and of the whole-caption dropout (``module.p_uncond``); the encoder
  zeroes the dropped features (``drop_encoders``, ldm.models.text_encoder_sd3). The mask is drawn on the host, as
  the caption dropout's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ldm.models.protocols import SeveralEncoders


def cached_context(text_encoder: nn.Module, batch: dict[str, Any], captions: list[str]) -> Any:
    """The batch's cached context, the empty prompt's in the rows whose caption is "" (dropped)."""
    rows = batch["context"]
    dropped = [c == "" for c in captions]
    if any(dropped):
        where = torch.tensor(dropped).to(rows.device).reshape(-1, *([1] * (rows.ndim - 1)))
        empty = text_encoder.cache_rows(text_encoder.empty_context(1))
        rows = torch.where(where, empty.to(rows), rows)
    return text_encoder.from_cache_rows(rows)


class EncoderDropout:
    """Per-encoder dropout of a text encoder made of several; off (no draw at all: the run's random streams are
    as without the option) when no probability is set or all are 0."""

    def __init__(self, text_encoder: nn.Module | None, probabilities: dict[str, float] | None = None):
        self.text_encoder = text_encoder
        self.probabilities = probabilities_of(text_encoder, probabilities)

    def __call__(self, context: Any, batch_size: int) -> Any:
        if self.probabilities is None:
            return context
        dropped = torch.rand(batch_size, len(self.probabilities)) < self.probabilities
        return self.text_encoder.drop_encoders(context, dropped)


def probabilities_of(text_encoder: nn.Module | None, probabilities: dict[str, float] | None) -> Tensor | None:
    """{name: p} (a missing name: 0) -> one probability per encoder in the text encoder's order; None when unset
    or all 0. Unknown names, values outside [0, 1] and a text encoder of one model are errors naming the key."""
    if not probabilities:
        return None
    if not isinstance(text_encoder, SeveralEncoders):
        raise ValueError(f"module.encoder_dropout drops encoders of a text encoder made of several (SD3's clip_l, "
                         f"clip_g, t5); {type(text_encoder).__name__} is one: use module.p_uncond")
    names = tuple(text_encoder.encoder_names)
    unknown = sorted(set(probabilities) - set(names))
    if unknown:
        raise ValueError(f"module.encoder_dropout: unknown encoder(s) {unknown}; this text encoder has {list(names)}")
    values = []
    for name in names:
        p = float(probabilities.get(name) or 0.0)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"module.encoder_dropout.{name} must be in [0, 1], got {probabilities.get(name)!r}")
        values.append(p)
    return torch.tensor(values) if any(values) else None
