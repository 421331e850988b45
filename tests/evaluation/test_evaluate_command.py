"""``python -m ldm.evaluate <checkpoint> ...``: a table and a JSON of the configured metrics in the run folder; the
same checkpoint twice gives the same numbers, and its validation loss is the one training logged."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.evaluate import main, overrides_from_argv
from ldm.cli.evaluate_config import compose_evaluate
from ldm.evaluation.extractors import INCEPTION_FILE
from ldm.cli.evaluate import EvaluateConfigError, evaluate

ROOT = Path(__file__).resolve().parents[2]
FAST = ["n=4", "sampler.steps=2", "batch_size=4"]


@pytest.fixture(scope="module")
def ckpt(metrics_run):
    result, _, _ = metrics_run
    return result["last_checkpoint"]


def test_command_prints_and_writes_all_metrics(ckpt, inception_weights, clip_folder, capsys):
    assert main([ckpt, *FAST, f"inception_weights={inception_weights}", f"clip_model={clip_folder}"]) == 0
    table = capsys.readouterr().out
    path = Path(ckpt).parent.parent / "eval" / "last.json"  # data and the output folder: from the checkpoint's run
    assert f"written: {path}" in table
    written = json.loads(path.read_text())
    assert set(written["metrics"]) == {"val_loss", "fid", "kid", "kid_std", "clip_score", "prompt_color_acc",
                                       "prompt_shape_acc"}
    assert written["skipped"] == {} and written["n"] == 4 and written["global_step"] == 3
    for name in ("val_loss", "fid", "kid", "clip_score", "prompt_color_acc", "prompt_shape_acc"):
        assert f"  {name} " in table
    assert f"{written['metrics']['val_loss']:.6g}" in table


def test_the_same_checkpoint_twice_gives_the_same_numbers(ckpt, clip_folder, tmp_path):
    overrides = [f"ckpt={ckpt}", *FAST, "metrics=[val_loss,clip_score,prompt_accuracy]", f"clip_model={clip_folder}",
                 f"out_dir={tmp_path}"]
    first, second = (evaluate(compose_evaluate(overrides))["metrics"] for _ in range(2))
    assert set(first) == {"val_loss", "clip_score", "prompt_color_acc", "prompt_shape_acc"}
    assert first == second


def test_validation_loss_is_the_one_training_logged(metrics_run, ckpt, tmp_path):
    result, _, _ = metrics_run
    # training logs val/loss of the raw U-Net on the first validation batch (batch size 4, limit_val_batches=1)
    cfg = compose_evaluate([f"ckpt={ckpt}", "n=4", "use_ema=false", "metrics=[val_loss]", f"out_dir={tmp_path}"])
    out = evaluate(cfg)
    assert out["metrics"]["val_loss"] == pytest.approx(result["metrics"]["val/loss"], rel=1e-5)
    assert out["path"] == str(tmp_path / "last.json") and out["skipped"] == {}


def test_missing_extractors_are_skipped_with_the_file_named(ckpt, tmp_path, capsys):
    missing = tmp_path / INCEPTION_FILE
    assert main([ckpt, *FAST, "metrics=[fid,kid,clip_score]", f"inception_weights={missing}",
                 f"clip_model={tmp_path / 'clip'}", f"out_dir={tmp_path}", "data=shapes",
                 "data.val.resolution=16"]) == 0
    table = capsys.readouterr().out
    assert f"fid, kid" in table and f"skipped: Inception weights not found: {missing}" in table
    assert "set inception_weights=<path to the file>" in table and "set clip_model=<folder>" in table
    written = json.loads((tmp_path / "last.json").read_text())
    assert written["metrics"] == {} and set(written["skipped"]) == {"fid", "kid", "clip_score"}


def test_bad_options_fail_before_loading_with_the_key_named(ckpt, tmp_path):
    with pytest.raises(EvaluateConfigError, match=r"metrics: unknown or empty \['fidd'\]"):
        evaluate(compose_evaluate([f"ckpt={ckpt}", "metrics=[fidd]"]))
    with pytest.raises(EvaluateConfigError, match="n must be >= 1"):
        evaluate(compose_evaluate([f"ckpt={ckpt}", "n=0"]))
    orphan = tmp_path / "model.ckpt"
    orphan.write_bytes(Path(ckpt).read_bytes())
    with pytest.raises(EvaluateConfigError, match="set data=<a configs/data/ option"):
        evaluate(compose_evaluate([f"ckpt={orphan}"]))
    with pytest.raises(FileNotFoundError, match="model not found"):
        evaluate(compose_evaluate([f"ckpt={tmp_path / 'none.ckpt'}"]))
    assert overrides_from_argv(["run/last.ckpt", "n=8"]) == ["ckpt=run/last.ckpt", "n=8"]


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "ldm.evaluate", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "python -m ldm.evaluate <checkpoint or export folder>" in out.stdout


def test_the_whole_sampler_node_reaches_the_pipeline(ckpt, tmp_path, monkeypatch):
    import ldm.pipelines
    from ldm.pipelines.sampling_options import SamplingOptions

    seen, real = [], ldm.pipelines.text_to_image

    def recording_text_to_image(bundle, prompts, **kwargs):
        seen.append(kwargs["sampler"])
        return real(bundle, prompts, **kwargs)

    monkeypatch.setattr(ldm.pipelines, "text_to_image", recording_text_to_image)
    cfg = compose_evaluate([f"ckpt={ckpt}", "n=4", "batch_size=4", "metrics=[prompt_accuracy]", f"out_dir={tmp_path}",
                            "sampler=dpmpp_2m", "sampler.karras=true", "sampler.steps=2"])
    out = evaluate(cfg)
    assert seen == [SamplingOptions(name="dpmpp_2m", steps=2, karras=True)]
    assert json.loads(Path(out["path"]).read_text())["settings"]["sampler"]["karras"] is True


def test_a_run_config_with_the_old_shapes_path_still_gives_its_data(tmp_path):
    """Runs made before the shapes moved to ldm/tasks/shapes/ name ldm.data.shapes.ShapesDataset in config.yaml."""
    from omegaconf import OmegaConf

    from ldm.cli.evaluate import data_config, validation_data
    from ldm.tasks.shapes.dataset import ShapesDataset

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    old = {"_target_": "ldm.data.shapes.ShapesDataset", "size": 8, "resolution": 16}
    OmegaConf.save({"data": {"_target_": "ldm.data.datamodule.ImageCaptionDataModule", "train": {**old, "seed": 0},
                             "val": {**old, "seed": 1}, "batch_size": 4}}, ckpt.parent.parent / "config.yaml")
    data = data_config(OmegaConf.create({"data": None, "ckpt": str(ckpt)}))
    assert data.train._target_ == data.val._target_ == "ldm.tasks.shapes.dataset.ShapesDataset"
    val, batch_size = validation_data(data)
    assert isinstance(val, ShapesDataset) and len(val) == 8 and val.seed == 1 and batch_size == 4


def test_a_run_config_naming_another_callable_is_refused_before_anything_runs(tmp_path):
    """A run folder may be downloaded: its config.yaml may only name our data classes (nothing else is imported)."""
    from omegaconf import OmegaConf

    from ldm.cli.evaluate import data_config

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    marker = tmp_path / "pwned"
    evil = {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}
    for data in ({"_target_": "ldm.data.datamodule.ImageCaptionDataModule", "train": evil, "batch_size": 4},
                 {"_target_": "numpy.load", "file": "x.npy", "allow_pickle": True}):
        OmegaConf.save({"data": data}, ckpt.parent.parent / "config.yaml")
        with pytest.raises(EvaluateConfigError, match=r"config\.yaml: data(\.train)?\._target_ = '(pathlib|numpy)"):
            data_config(OmegaConf.create({"data": None, "ckpt": str(ckpt)}))
    assert not marker.exists()
