"""FluxTextEncoder against diffusers' FluxPipeline.encode_prompt on a tiny local folder (a tiny CLIP-L-like
CLIPTextModel + a tiny T5 encoder): the T5 tokens and the CLIP pooled output equal; without a T5 the tokens are
zeros of the configured length."""

import pytest
import torch

from ldm.models.text_encoder_flux import FluxTextEncoder
from tests.helpers.flux import T5_LENGTH, tiny_flux_text_folder

diffusers = pytest.importorskip("diffusers")

def test_flux_text_encoder_equals_flux_pipeline_encode_prompt(tmp_path):
    from diffusers import FluxPipeline
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    folder = tiny_flux_text_folder(tmp_path / "flux")
    ours = FluxTextEncoder.from_pretrained(folder, joint_dim=24, t5_length=T5_LENGTH)
    pipe = FluxPipeline(scheduler=None, vae=None, transformer=None,
                        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
                        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2"),
                        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"))
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        tokens, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=T5_LENGTH)
        got = ours(prompts)
    assert tokens.shape == (2, T5_LENGTH, 24) and pooled.shape == (2, 32) and not text_ids.any()
    torch.testing.assert_close(got["crossattn"], tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["vector"], pooled, atol=1e-6, rtol=0)
    assert ours.context_dim == 24 and ours.pooled_dim == 32 and not any(p.requires_grad for p in ours.parameters())
    empty = ours.empty_context(3)
    assert empty["crossattn"].shape == (3, T5_LENGTH, 24)
    no_t5 = FluxTextEncoder.from_pretrained(folder, use_t5=False, joint_dim=24, t5_length=T5_LENGTH)
    out = no_t5(prompts)
    assert not out["crossattn"].any() and torch.equal(out["vector"], got["vector"])
    with pytest.raises(ValueError, match="joint_dim"):
        FluxTextEncoder.from_pretrained(folder, joint_dim=32)
