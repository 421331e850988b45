"""The shapes task's end-of-training callback (callbacks.prompt_accuracy), configured from its new home: it samples
every colour x shape prompt with CFG, without and unconditionally, scores them with the dataset's checker, writes
prompt_accuracy.json and the grid, and skips data that is not the shapes."""

import json
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate

from ldm.tasks.shapes.dataset import ShapesDataset
from ldm.tasks.shapes.prompt_accuracy import PromptAccuracyCallback
from ldm.training.run.train import build_diffusion_module
from tests.helpers.training import TINY_MODEL, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer_on(dataset, folder):
    return SimpleNamespace(datamodule=SimpleNamespace(train_dataset=dataset), is_global_zero=True, loggers=[],
                           default_root_dir=str(folder), global_step=3)


def test_scores_every_prompt_and_writes_the_results(tmp_path):
    cfg = compose_train(tmp_path, TINY_MODEL + ["module.ema_decay=null"])
    callback = PromptAccuracyCallback(n_per_prompt=1, sampler={"steps": 2}, batch_size=8)
    data = ShapesDataset(size=4, resolution=16, colors=("red", "blue"), shapes=("circle", "square"))
    callback.on_train_end(trainer_on(data, tmp_path), build_diffusion_module(cfg))
    results = callback.results
    assert results["n"] == 4 and results["steps"] == 2
    for name in ("cfg", "no_cfg", "uncond"):
        assert set(results[name]) == {"color_acc", "shape_acc"}
        assert all(0.0 <= v <= 1.0 for v in results[name].values())
    assert json.loads((tmp_path / "prompt_accuracy.json").read_text())["cfg"] == results["cfg"]
    assert (tmp_path / "prompt_accuracy_cfg.png").is_file()


def test_the_prompts_cover_every_colour_shape_pair_and_background():
    data = ShapesDataset(size=4, resolution=16, colors=("red", "white"), shapes=("circle", "triangle"))
    prompts = PromptAccuracyCallback(n_per_prompt=2).prompts(data)
    assert len(prompts) == 8 and "a white triangle on a black background" in prompts
    assert {p.split(" on a ")[1] for p in prompts if p.startswith("a red")} == {"white background",
                                                                                "black background", "gray background"}


def test_other_data_is_skipped(tmp_path):
    callback = PromptAccuracyCallback()
    callback.on_train_end(trainer_on([{"caption": "a cat", "image": None}], tmp_path), None)
    assert callback.results is None and not (tmp_path / "prompt_accuracy.json").exists()


def test_the_default_callbacks_point_at_the_task(tmp_path):
    cfg = compose_train(tmp_path, ["callbacks=default"])
    assert cfg.callbacks.prompt_accuracy._target_ == "ldm.tasks.shapes.prompt_accuracy.PromptAccuracyCallback"
    assert isinstance(instantiate(cfg.callbacks.prompt_accuracy), PromptAccuracyCallback)
