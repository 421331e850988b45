"""Feature extractors from local files: the Inception weight file in torch-fidelity's layout and a CLIP folder in
transformers' layout; a missing or wrong file gives a message naming the file, where to get it and the key."""

import hashlib

import pytest
import torch

from ldm.evaluation.extractors import (INCEPTION_FILE, INCEPTION_URL, MissingExtractorError, load_clip,
                                       load_inception)
from ldm.evaluation.inception import FIDInceptionV3
from ldm.evaluation.metrics import build_image_metrics

# sha256 of "name:shape" lines of torch-fidelity 0.4.0's FeatureExtractorInceptionV3 state_dict (566 entries):
# the weight file it converted from TensorFlow loads into FIDInceptionV3 only with exactly these names and shapes.
TORCH_FIDELITY_LAYOUT = "b45715ac497e250fa7f72d1ef3ee440168ea622a4180b55a5c8dabd2d9d5258b"


def test_inception_has_torch_fidelity_parameter_layout():
    state = FIDInceptionV3().state_dict()
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    assert len(state) == 566
    assert hashlib.sha256(lines.encode()).hexdigest() == TORCH_FIDELITY_LAYOUT


def test_inception_loads_the_local_weight_file(inception_weights):
    expected = torch.load(inception_weights, weights_only=True)
    assert isinstance(load_inception(inception_weights.parent), FIDInceptionV3)  # the folder holding the file
    metrics = build_image_metrics(["fid"], inception_weights=str(inception_weights), n_images=2)
    model = metrics.metrics["fid"].inception.extractor
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    model.train()
    assert not model.training  # BatchNorm keeps the converted statistics
    images = torch.rand(2, 3, 16, 16)
    features = model(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert not torch.equal(features[0], features[1])
    metrics.update_real(images * 2 - 1)
    metrics.mark_real_done()
    metrics.update_generated(images * 2 - 1, ["", ""])
    assert metrics.compute()["fid"] == pytest.approx(0.0, abs=1e-2)


def test_missing_inception_weights_say_which_file_where_and_which_key(tmp_path):
    missing = tmp_path / INCEPTION_FILE
    with pytest.raises(MissingExtractorError) as err:
        load_inception(missing, key="callbacks.metrics.inception_weights")
    message = str(err.value)
    assert str(missing) in message and INCEPTION_URL in message
    assert "set callbacks.metrics.inception_weights=" in message
    with pytest.raises(MissingExtractorError, match="inception_weights is not set"):
        load_inception(None)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(MissingExtractorError, match=f"(?s)not torch-fidelity's Inception weight file.*{INCEPTION_FILE}"):
        load_inception(wrong)
    metrics = build_image_metrics(["fid", "kid", "clip_score"], inception_weights=str(missing),
                                  clip_model=str(tmp_path / "no-clip"), key_prefix="callbacks.metrics.")
    assert not metrics  # nothing left to compute, and no exception
    assert metrics.skipped["fid"] == metrics.skipped["kid"] and INCEPTION_FILE in metrics.skipped["fid"]
    assert metrics.skipped_groups()[0][0] == ["fid", "kid"]
    assert "callbacks.metrics.clip_model=<folder>" in metrics.skipped["clip_score"]


def test_clip_score_runs_from_a_local_transformers_folder(clip_folder):
    model, processor = load_clip(clip_folder)
    metrics = build_image_metrics(["clip_score"], clip_model=str(clip_folder))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    prompts = ["a red circle on a white background", "a blue square on a black background", "a green triangle"]
    metrics.update_generated(images, prompts)
    score = metrics.compute()["clip_score"]
    # the same number by hand: 100 x cosine of CLIP's image and text embeddings, mean, floored at 0
    pixels = processor(images=[i for i in ((images + 1) / 2 * 255).round().to(torch.uint8)], return_tensors="pt")
    text = processor(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixels["pixel_values"])
        txt = model.get_text_features(text["input_ids"], text["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert score == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)


def test_incomplete_clip_folder_names_what_is_missing(tmp_path, clip_folder):
    with pytest.raises(MissingExtractorError, match="CLIP model folder not found.*set clip_model=<folder>"):
        load_clip(tmp_path / "nope")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((clip_folder / "config.json").read_text())
    with pytest.raises(MissingExtractorError, match="lacks model.safetensors or pytorch_model.bin, "
                                                    "preprocessor_config.json or processor_config.json"):
        load_clip(partial, key="clip_model")
