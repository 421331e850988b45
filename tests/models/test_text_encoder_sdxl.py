"""SDXL's dual text encoder and micro-conditioning embedding against transformers / diffusers (no downloads)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.models.sdxl_conditioning import sdxl_vector, size_embedding, size_values  # noqa: E402
from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder, sdxl_text_configs  # noqa: E402
from ldm.models.tiny_clip import write_tiny_sdxl_clips  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle on a white background", "two blue squares"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_sdxl_clips(tmp_path_factory.mktemp("tiny_sdxl_clip"))


@pytest.fixture(scope="module")
def encoder(folder):
    return DualCLIPTextEncoder.from_pretrained(folder)


def test_matches_transformers_as_sdxl_pipeline_uses_them(encoder, folder):
    """diffusers StableDiffusionXLPipeline.encode_prompt: hidden_states[-2] of both, concatenated; pooled =
    text_encoder_2's text_embeds; each prompt tokenized by its own tokenizer."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    te1 = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
    tok1 = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    with torch.no_grad():
        ids1 = tok1(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = tok2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        o1, o2 = te1(ids1, output_hidden_states=True), te2(ids2, output_hidden_states=True)
        want_ctx = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        want_pooled = o2[0]
    assert not torch.equal(ids1, ids2)  # bigG's tokenizer pads with "!", ViT-L's with EOS
    out = encoder(PROMPTS)
    assert out["crossattn"].shape == (2, 77, 32 + 48) and encoder.context_dim == 80
    assert out["pooled"].shape == (2, 16) and encoder.pooled_dim == 16
    torch.testing.assert_close(out["crossattn"], want_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pooled"], want_pooled, atol=1e-5, rtol=1e-5)
    # penultimate, not the last layer; no final LayerNorm on the context
    assert not torch.allclose(out["crossattn"][..., :32], o1.last_hidden_state, atol=1e-3)


def test_uncond_is_zeros_or_empty_prompt(encoder, folder):
    zero = encoder.empty_context(3)
    assert zero["crossattn"].shape == (3, 77, 80) and zero["pooled"].shape == (3, 16)
    assert not zero["crossattn"].any() and not zero["pooled"].any()
    empty = DualCLIPTextEncoder.from_pretrained(folder, zero_uncond=False).empty_context(1)
    torch.testing.assert_close(empty["pooled"], encoder([""])["pooled"])
    assert empty["pooled"].abs().sum() > 0


def test_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model_2.training


def test_sdxl_sizes_on_meta():
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vit_l, big_g = sdxl_text_configs()
    with torch.device("meta"):
        n1 = sum(p.numel() for p in CLIPTextModel(vit_l).parameters())
        n2 = sum(p.numel() for p in CLIPTextModelWithProjection(big_g).parameters())
    assert n1 == 123_060_480  # CLIP ViT-L/14 text tower (as SD 1.x)
    assert n2 == 694_659_840  # OpenCLIP ViT-bigG/14 text tower with its 1280x1280 projection
    assert vit_l.hidden_size + big_g.hidden_size == 2048 and big_g.projection_dim + 6 * 256 == 2816


def test_size_embedding_equals_diffusers_add_time_proj():
    from diffusers.models.embeddings import Timesteps

    sizes = size_values(torch.tensor([[1024, 768], [512, 512]]), torch.tensor([[0, 32], [16, 0]]),
                        torch.tensor([[1024, 1024], [512, 640]]))
    assert sizes.tolist()[0] == [1024, 768, 0, 32, 1024, 1024]
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)  # UNet2DConditionModel.add_time_proj
    want = proj(sizes.flatten()).reshape(2, -1)
    torch.testing.assert_close(size_embedding(sizes), want, atol=1e-5, rtol=1e-5)
    pooled = torch.randn(2, 1280)
    y = sdxl_vector(pooled, sizes)
    assert y.shape == (2, 2816) and torch.equal(y[:, :1280], pooled)
    with pytest.raises(ValueError, match="batch sizes"):
        size_values(torch.zeros(2, 2), torch.zeros(1, 2), torch.zeros(2, 2))


# ------------------------------------------------------------------------------------ long prompts (max_chunks)

def reference_chunks(folder, prompt: str, chunks: int) -> dict:
    """ComfyUI's SDXL layout computed here from the vocabularies, without the encoder's tokenizer code: 75 tokens a
    chunk, each BOS + tokens + EOS + pad (ViT-L pads with EOS, bigG with "!"); every chunk through transformers'
    models alone; the contexts concatenated, the pooled embedding the first chunk's (comfy/sd1_clip.py first_pooled)."""
    import json

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ldm.models.tiny_clip import BOS, EOS

    contexts, pooled = [], None
    for i, (tok, sub, cls, pad) in enumerate([("tokenizer", "text_encoder", CLIPTextModel, EOS),
                                              ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection, "!")]):
        vocab = json.loads((folder / tok / "vocab.json").read_text())
        ids = [vocab[w + "</w>"] for w in prompt.split()]
        rows = [[vocab[BOS]] + p + [vocab[EOS]] + [vocab[pad]] * (75 - len(p))
                for p in (ids[k:k + 75] for k in range(0, 75 * chunks, 75))]
        model = cls.from_pretrained(folder / sub).eval()
        with torch.no_grad():
            outs = [model(torch.tensor([row]), output_hidden_states=True) for row in rows]
        contexts.append(torch.cat([o.hidden_states[-2] for o in outs], dim=1)[0])
        if i == 1:
            pooled = outs[0].text_embeds[0]
    return {"crossattn": torch.cat(contexts, dim=-1), "pooled": pooled}


def test_long_prompts_are_chunked_for_both_encoders(folder, encoder):
    words = "a red green blue circle square triangle star on white black background".split()
    p100, p160 = (" ".join(words[i % len(words)] for i in range(n)) for n in (100, 160))
    enc = DualCLIPTextEncoder.from_pretrained(folder, max_chunks=3)
    out = enc([p100, p160, PROMPTS[1]])
    assert out["crossattn"].shape == (3, 3 * 77, 80) and out["pooled"].shape == (3, 16)
    for row, prompt in enumerate([p100, p160, PROMPTS[1]]):
        ref = reference_chunks(folder, prompt, 3)
        torch.testing.assert_close(out["crossattn"][row], ref["crossattn"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["pooled"][row], ref["pooled"], atol=1e-5, rtol=0)
    # one chunk (the default) is SDXL's plain 77-token encoding; a short prompt's first chunk is the same
    torch.testing.assert_close(encoder([PROMPTS[1]])["crossattn"][0], out["crossattn"][2, :77], atol=1e-6, rtol=0)
    # CFG: the zero unconditional text as long as the prompt; padding with the empty prompt's chunks
    assert enc.empty_context(2, chunks=3)["crossattn"].shape == (2, 231, 80)
    assert not enc.empty_context(1, chunks=3)["crossattn"].any()
    alone = enc([p100])
    padded = enc.pad_context({**alone, "vector": torch.ones(1, 3)}, 231)
    torch.testing.assert_close(padded["crossattn"], enc([p100, p160])["crossattn"][:1], atol=1e-6, rtol=0)
    assert torch.equal(padded["vector"], torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_chunks"):
        DualCLIPTextEncoder.from_pretrained(folder, max_chunks=0)
