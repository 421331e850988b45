"""SD3's text conditioning in training (model=mmdit_tiny): each encoder dropped on its own with its probability
(module.encoder_dropout; frequencies and independence under a seeded generator), nothing drawn without it, bad
settings named; contexts from the latent cache give the same loss as encoded ones, and a run caches them."""

import json

import pytest
import torch

from ldm.training.module.text_context import probabilities_of
from ldm.training.run.latent_prep import encode_captions
from ldm.training.run.train import build_diffusion_module, train
from tests.helpers.models import randomize
from tests.helpers.training import MMDIT_TINY, compose_train

DROPOUT = "module.encoder_dropout={clip_l: 0.2, clip_g: 0.5, t5: 0.8}"


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    return build_diffusion_module(compose_train(tmp, MMDIT_TINY + [DROPOUT, "module.p_uncond=0.5"]))


def test_each_encoder_drops_with_its_own_probability_independently(module):
    n = 20_000
    context = {"crossattn": torch.ones(n, 77 + 8, 96), "vector": torch.ones(n, 32)}
    torch.manual_seed(0)
    out = module.encoder_dropout(context, n)
    # which encoders a row dropped: their features are zeros (CLIP-L: columns 0-31, CLIP-G: 32-79, T5: tokens 77+)
    dropped = torch.stack([out["crossattn"][:, 0, 0] == 0, out["crossattn"][:, 0, 32] == 0,
                           out["crossattn"][:, 77, 0] == 0], dim=1).float()
    assert torch.equal(out["vector"][:, 0] == 0, dropped[:, 0].bool())  # the pooled halves go with their CLIP
    assert torch.equal(out["vector"][:, 16] == 0, dropped[:, 1].bool())
    p = torch.tensor([0.2, 0.5, 0.8])
    # binomial standard error at n = 20,000 is at most 0.0036: 0.015 is > 4 of them (and the draw is seeded)
    torch.testing.assert_close(dropped.mean(0), p, atol=0.015, rtol=0)
    for i, j in ((0, 1), (0, 2), (1, 2)):  # independent: P(both) = P(i) P(j)
        assert abs((dropped[:, i] * dropped[:, j]).mean() - p[i] * p[j]) < 0.015


def test_without_encoder_dropout_nothing_is_drawn(tmp_path):
    plain = build_diffusion_module(compose_train(tmp_path, MMDIT_TINY))
    assert plain.encoder_dropout.probabilities is None
    context = {"crossattn": torch.ones(2, 85, 96), "vector": torch.ones(2, 32)}
    state = torch.get_rng_state()
    assert plain.encoder_dropout(context, 2) is context
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is as before the option existed


def test_bad_encoder_dropout_names_the_fix(module):
    from ldm.models.text_encoder import CLIPTextEncoder

    te = module.text_encoder
    assert probabilities_of(te, {"t5": 0.0}) is None  # all zero: off
    with pytest.raises(ValueError, match=r"unknown encoder\(s\) \['clip_h'\]"):
        probabilities_of(te, {"clip_h": 0.1})
    with pytest.raises(ValueError, match=r"encoder_dropout.t5 must be in \[0, 1\]"):
        probabilities_of(te, {"t5": 1.5})
    with pytest.raises(ValueError, match="p_uncond"):
        probabilities_of(CLIPTextEncoder.from_tiny(), {"clip_l": 0.1})


def test_cached_contexts_give_the_encoded_loss(module):
    """The same batch from the latent cache (contexts as rows, the dropped captions' replaced by the empty prompt's)
    and encoded live: the same loss under the same seed, with caption and encoder dropout on."""
    randomize(module.unet, 4)  # a fresh MMDiT is adaLN-Zero: its output would not depend on the context
    captions = ["a red circle", "a blue square", "a green triangle", "a red square"]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    live = {"latents": latents, "caption": captions}
    cached = {**live, "context": encode_captions(module.text_encoder, captions, torch.device("cpu"))}
    torch.manual_seed(1)
    assert module.drop_captions(captions)[1].any()  # this seed drops a caption: the cached path's empty rows
    losses = []
    for batch in (live, cached):
        torch.manual_seed(1)
        with torch.no_grad():
            losses.append(module.step_loss(batch))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)


def test_a_run_caches_sd3_contexts(tmp_path):
    overrides = [o for o in MMDIT_TINY if "latent_cache" not in o]
    result = train(compose_train(tmp_path, overrides + [f"data.latent_cache={tmp_path / 'cache'}", DROPOUT,
                                                        "trainer.max_steps=2", "trainer.val_check_interval=2"]))
    assert result["global_step"] == 2 and torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    manifests = list((tmp_path / "cache").glob("*/part-*/manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["text"] == "context" and manifest["context_shape"] == [77 + 8 + 1, 96]
