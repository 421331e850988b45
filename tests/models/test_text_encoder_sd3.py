"""SD3's text conditioning (SD3TextEncoder): contexts equal to diffusers' StableDiffusion3Pipeline.encode_prompt
(transformers' CLIPTextModelWithProjection x 2 + T5EncoderModel) with and without a T5; the T5 dropped at sampling
gives diffusers' text_encoder_3=None context; each encoder's features zeroed on its own (drop_encoders); the cache
rows round trip exactly."""

import pytest
import torch

from tests.helpers.sd3_pair import T5_LENGTH, tiny_sd3

pytest.importorskip("diffusers")

PROMPTS = ["a red circle", "a blue square", ""]


def diffusers_context(pipe):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
    return {"crossattn": embeds, "vector": pooled}


def assert_equal_context(got, expected, atol=1e-6):
    assert set(got) == {"crossattn", "vector"}
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0)


@pytest.mark.parametrize("use_t5", [True, False], ids=["t5", "no_t5"])
def test_contexts_equal_stable_diffusion3_encode_prompt(tmp_path, use_t5):
    pipe, bundle = tiny_sd3(tmp_path, use_t5=use_t5)
    with torch.no_grad():
        ours = bundle.text_encoder(PROMPTS)
    assert ours["crossattn"].shape == (3, 77 + T5_LENGTH, 96) and ours["vector"].shape == (3, 64)
    assert (ours["crossattn"][:, 77:].abs().max() > 0) == use_t5  # T5's tokens, or zeros without one
    assert_equal_context(ours, diffusers_context(pipe))


def test_t5_dropped_at_sampling_is_diffusers_without_text_encoder_3(tmp_path):
    _, with_t5 = tiny_sd3(tmp_path, use_t5=True)
    pipe_without, _ = tiny_sd3(tmp_path, use_t5=False)  # the same CLIPs
    from ldm.pipelines.cli import SampleConfigError, skip_t5

    te = with_t5.text_encoder
    full = te(PROMPTS)
    skip_t5(with_t5)  # sample.py t5=false
    assert te.t5 is None
    without = te(PROMPTS)
    assert (full["crossattn"] - without["crossattn"]).abs().max() > 1e-3  # the T5 mattered
    assert_equal_context(without, diffusers_context(pipe_without))
    from ldm.models.bundle import ModelBundle
    from ldm.models.text_encoder import CLIPTextEncoder

    with pytest.raises(SampleConfigError, match="t5=false.*SD3"):
        skip_t5(ModelBundle(with_t5.unet, with_t5.autoencoder, CLIPTextEncoder.from_tiny(), with_t5.schedule))


def test_each_encoder_is_dropped_on_its_own(tmp_path):
    """Row r drops the encoders of mask row r; a dropped encoder's features are zeros (CLIP-L: its 32 columns of
    the 77 CLIP tokens and its 32 pooled values; CLIP-G: the next 48 / 32; T5: the tokens after 77), the rest is
    untouched."""
    _, bundle = tiny_sd3(tmp_path, use_t5=True)
    te = bundle.text_encoder
    assert te.encoder_names == ("clip_l", "clip_g", "t5")
    masks = torch.tensor([[True, False, False], [False, True, True], [False, False, False], [True, True, True]])
    context = te(["a red circle"] * 4)
    dropped = te.drop_encoders(context, masks)
    c, d = context["crossattn"], dropped["crossattn"]
    v, dv = context["vector"], dropped["vector"]
    regions = {  # encoder -> (token slice, feature slice) of crossattn, pooled slice
        0: ((slice(0, 77), slice(0, 32)), slice(0, 32)),
        1: ((slice(0, 77), slice(32, 80)), slice(32, 64)),
        2: ((slice(77, None), slice(None)), None),
    }
    for row, mask in enumerate(masks.tolist()):
        expected, expected_v = c[row].clone(), v[row].clone()
        for enc, drop in enumerate(mask):
            (tokens, features), pooled = regions[enc]
            assert c[row][tokens, features].abs().max() > 0  # there was something to drop
            if drop:
                expected[tokens, features] = 0
                if pooled is not None:
                    expected_v[pooled] = 0
        assert torch.equal(d[row], expected) and torch.equal(dv[row], expected_v)
    assert not d[3].any() and not dv[3].any()  # all three dropped: an all-zero conditioning
    with pytest.raises(ValueError, match="mask"):
        te.drop_encoders(context, masks[:, :2])


def test_cache_rows_round_trip_exactly(tmp_path):
    _, bundle = tiny_sd3(tmp_path, use_t5=True)
    te = bundle.text_encoder
    assert te.context_cacheable
    context = te(PROMPTS)
    rows = te.cache_rows(context)
    assert rows.shape == (3, 77 + T5_LENGTH + 1, 96)  # the tokens, then the pooled vector zero-padded
    assert not rows[:, -1, 64:].any()
    back = te.from_cache_rows(rows)
    assert all(torch.equal(back[k], context[k]) for k in context)
    with pytest.raises(ValueError, match="rebuild the latent cache"):
        te.from_cache_rows(rows[:, :, :8])
