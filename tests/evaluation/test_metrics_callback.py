"""The metrics callback in a tiny training run: a missing Inception file is reported once before training, naming
the file and the key, the run completes, and the other metrics reach every logger; sampling for the metrics is
deterministic and leaves the training RNG alone."""

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm.evaluation.extractors import INCEPTION_FILE, INCEPTION_URL
from ldm.training.callbacks.metrics import ImageMetricsCallback


def test_missing_inception_is_reported_once_and_the_run_completes(metrics_run):
    result, missing, records = metrics_run
    assert result["global_step"] == 3
    inception = [r.getMessage() for r in records if INCEPTION_FILE in r.getMessage()]
    assert len(inception) == 1, inception  # once, for FID and KID together
    message = inception[0]
    assert "fid and kid skipped" in message and str(missing) in message and INCEPTION_URL in message
    assert "set callbacks.metrics.inception_weights=<path to the file>" in message
    assert "val/fid" not in result["metrics"] and "val/kid" not in result["metrics"]  # absent, not a silent zero


def test_other_metrics_are_logged_to_the_loggers(metrics_run):
    result, _, _ = metrics_run
    for key in ("val/clip_score", "val/prompt_color_acc", "val/prompt_shape_acc", "val/loss"):
        assert key in result["metrics"], key
    assert 0.0 <= result["metrics"]["val/prompt_color_acc"] <= 1.0
    with open(Path(result["run_dir"]) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/clip_score")]
    assert len(rows) == 1 and float(rows[0]["val/clip_score"]) == pytest.approx(result["metrics"]["val/clip_score"])


def test_metric_sampling_is_deterministic_and_keeps_the_training_rng(tmp_path, clip_folder):
    from hydra.utils import instantiate

    from ldm.training.run.train import build_diffusion_module
    from tests.helpers.training import TINY_MODEL, compose_train

    cfg = compose_train(tmp_path, TINY_MODEL + ["data.val.resolution=16"])
    module = build_diffusion_module(cfg)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    trainer = SimpleNamespace(datamodule=dm, limit_val_batches=1, world_size=1, global_rank=0, is_global_zero=True)
    callback = ImageMetricsCallback(metrics=["clip_score", "prompt_accuracy"], n_images=2, sampler={"steps": 2}, batch_size=2,
                                    clip_model=str(clip_folder))
    callback.setup(trainer, module, "fit")
    assert list(callback.image_metrics.metrics) == ["clip_score", "prompt_accuracy"] and not callback.warnings
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = callback.compute(trainer, module)
    assert torch.equal(torch.get_rng_state(), state)
    assert callback.compute(trainer, module) == first


def test_no_validation_data_is_reported(clip_folder):
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_dataset=None), is_global_zero=True)
    callback = ImageMetricsCallback(clip_model=str(clip_folder))
    callback.setup(trainer, None, "fit")
    assert callback.image_metrics is None and "no validation data" in callback.warnings[0]
    with pytest.raises(ValueError, match="callbacks.metrics.metrics: unknown metric"):
        ImageMetricsCallback(metrics=["fid", "is"])
