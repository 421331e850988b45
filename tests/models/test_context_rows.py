"""A context with a pooled vector as the one tensor the latent cache stores (ldm.models.context_rows): exact both
ways for SDXL's pair as for SD3's (tests/models/test_text_encoder_sd3.py); a pooled vector wider than a row, or rows
of another encoder, are refused by name."""

import pytest
import torch

from ldm.models.context_rows import pack_rows, unpack_rows
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder


def test_sdxl_pair_round_trips_and_a_single_context_is_its_own_rows():
    te = DualCLIPTextEncoder.from_tiny()
    context = te(["a red circle", ""])
    rows = te.cache_rows(context)
    assert rows.shape == (2, context["crossattn"].shape[1] + 1, te.context_dim)
    back = te.from_cache_rows(rows)
    assert all(torch.equal(back[k], context[k]) for k in context)
    clip = CLIPTextEncoder.from_tiny()
    c = clip(["a red circle"])
    assert clip.from_cache_rows(clip.cache_rows(c)) is c


def test_rows_that_cannot_hold_the_context_are_refused():
    with pytest.raises(ValueError, match="does not fit a context row"):
        pack_rows(torch.zeros(1, 3, 4), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="rebuild the latent cache"):
        unpack_rows(torch.zeros(1, 3, 4), 5)
