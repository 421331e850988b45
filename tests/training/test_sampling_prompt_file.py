"""callbacks.sampling.prompt_file: each prompt of a kohya sample-prompt file is sampled with its own settings and
labelled with them in the grid; a bad file stops the run before it trains."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ldm.training.callbacks.sampling as sampling
from ldm.pipelines import text_to_image
from ldm.pipelines.sampling_options import SamplingOptions
from ldm.training.run.config_checks import ConfigError
from ldm.training.run.train import build_diffusion_module, train
from tests.helpers.models import randomize
from tests.helpers.training import TINY_MODEL, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = """\
# two prompts at the callback's settings, one with its own (the tiny model: sides are multiples of 4)
a red circle
a blue square --n blurry, dark --w 8 --h 16 --d 42 --l 4 --s 2 --ss euler_a
a green triangle
"""
SAMPLING = ["+callbacks.sampling._target_=ldm.training.callbacks.sampling.SamplingCallback",
            "+callbacks.sampling.every_n_steps=2", "+callbacks.sampling.sampler.steps=3",
            "+callbacks.sampling.guidance_scale=2.0"]
LABELS = ["a red circle\n16x16 s3 g2 seed0 ddim",
          "a blue square\n8x16 s2 g4 seed42 euler_ancestral\nneg: blurry, dark",
          "a green triangle\n16x16 s3 g2 seed0 ddim"]


def prompt_file(tmp_path: Path, text: str = PROMPTS) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def record(monkeypatch):
    """Every generate() call (prompts, options, images) and every grid's labels and cell sizes."""
    seen = SimpleNamespace(calls=[], grids=[])
    real_generate, real_grid = sampling.generate, sampling.labelled_grid

    def generate(pl_module, prompts, **options):
        images = real_generate(pl_module, prompts, **options)
        seen.calls.append((list(prompts), options, images))
        return images

    def labelled_grid(images, labels=None, **kwargs):
        seen.grids.append((list(labels), [im.size for im in images]))
        return real_grid(images, labels=labels, **kwargs)

    monkeypatch.setattr(sampling, "generate", generate)
    monkeypatch.setattr(sampling, "labelled_grid", labelled_grid)
    return seen


def test_each_prompt_is_sampled_with_its_own_settings(tmp_path, record):
    module = build_diffusion_module(compose_train(tmp_path, TINY_MODEL + ["module.ema_decay=null"]))
    randomize(module.unet, 1)
    callback = sampling.SamplingCallback(prompt_file=str(prompt_file(tmp_path)), sampler={"steps": 3},
                                         guidance_scale=2.0, resolution=16)
    trainer = SimpleNamespace(global_step=5, default_root_dir=str(tmp_path / "run"), loggers=[], datamodule=None,
                              lightning_module=module)
    out = callback.sample_grid(trainer, module)
    assert out.is_file() and callback.result() == {"sample_grid": str(out)}
    (plain_prompts, plain, _), (own_prompts, own, own_images) = record.calls  # equal settings share one call
    assert plain_prompts == ["a red circle", "a green triangle"]
    assert plain == dict(resolution=(16, 16), sampler=SamplingOptions(steps=3), guidance_scale=2.0, seed=0,
                         negative_prompt=None, use_ema=True)
    assert own_prompts == ["a blue square"]
    assert own == dict(resolution=(16, 8), sampler=SamplingOptions(name="euler_ancestral", steps=2),
                       guidance_scale=4.0, seed=42, negative_prompt="blurry, dark", use_ema=True)
    direct = text_to_image(module.bundle(), ["a blue square"], sampler="euler_ancestral", steps=2, guidance_scale=4.0,
                           seed=42, height=16, width=8, negative_prompt="blurry, dark")
    assert torch.equal(own_images, direct)
    labels, sizes = record.grids[0]
    assert labels == LABELS
    assert sizes == [(16, 16), (8, 16), (16, 16)]  # PIL sizes: (width, height)


def test_a_training_run_samples_from_a_prompt_file(tmp_path, record):
    cfg = compose_train(tmp_path, TINY_MODEL + SAMPLING + [f"+callbacks.sampling.prompt_file={prompt_file(tmp_path)}"])
    result = train(cfg)
    grid = Path(result["sample_grid"])
    assert grid.name == "step_000003.png" and grid.is_file()
    assert sorted(p.name for p in grid.parent.glob("*.png")) == ["step_000002.png", "step_000003.png"]
    assert [labels for labels, _ in record.grids] == [LABELS, LABELS]


def test_a_size_the_model_cannot_take_stops_the_run_before_training(tmp_path, record):
    path = prompt_file(tmp_path, "a red circle\na blue square --w 10\n")
    cfg = compose_train(tmp_path, TINY_MODEL + SAMPLING + [f"+callbacks.sampling.prompt_file={path}"])
    with pytest.raises(ValueError, match=r"prompts.txt:2: --w 10 is not a multiple of 4, which this model needs"):
        train(cfg)
    assert not record.calls and not (tmp_path / "run" / "metrics.csv").exists()  # no step trained, none sampled


def test_a_bad_line_stops_the_run_before_anything_is_built(tmp_path):
    path = prompt_file(tmp_path, "a red circle\na blue square --cn pose.png\n")
    cfg = compose_train(tmp_path, TINY_MODEL + SAMPLING + [f"+callbacks.sampling.prompt_file={path}"])
    with pytest.raises(ConfigError, match=r"callbacks.sampling.prompt_file: .*prompts.txt:2: kohya's --cn \(ControlNet "
                                          r"image\) is not supported"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_the_default_callbacks_take_a_prompt_file(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_train(tmp_path, ["experiment=shapes_lora", f"callbacks.sampling.prompt_file={prompt_file(tmp_path)}"])
    callback = instantiate(cfg.callbacks.sampling)
    assert callback.prompts == ["a red circle", "a blue square", "a green triangle"]  # in place of the experiment's
