"""The training callbacks get the whole sampler node: ``sampler=dpmpp_2m sampler.karras=true`` samples the
training grids, the prompt accuracy and the metrics with Karras sigmas (it used to pass only the name)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

import ldm.diffusion.samplers as samplers
from ldm.pipelines import text_to_image
from ldm.pipelines.sampling_options import SamplingOptions
from ldm.training.run.train import build_diffusion_module
from tests.helpers.models import randomize
from tests.helpers.training import TINY_MODEL, compose_train

PROMPTS = ["a red circle", "a blue square"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_run_samples_as_before(tmp_path):
    cfg = compose_train(tmp_path, [])
    for key in ("sampling", "prompt_accuracy"):
        assert instantiate(cfg.callbacks[key]).sampler == SamplingOptions(name="ddim", steps=25)


@pytest.mark.parametrize("callbacks", ["default", "metrics"])
def test_every_callback_gets_the_whole_node(tmp_path, callbacks):
    cfg = compose_train(tmp_path, [f"callbacks={callbacks}", "sampler=dpmpp_2m", "sampler.karras=true",
                                   "sampler.steps=7", "sampler.spacing=trailing"])
    want = SamplingOptions(name="dpmpp_2m", steps=7, karras=True, spacing="trailing")
    keys = ["sampling", "prompt_accuracy"] + (["metrics"] if callbacks == "metrics" else [])
    for key in keys:
        assert instantiate(cfg.callbacks[key]).sampler == want, key


def test_a_bad_sampler_setting_names_the_callback_key(tmp_path):
    cfg = compose_train(tmp_path, ["sampler=ddim", "sampler.karras=true"])
    with pytest.raises(Exception, match=r"callbacks\.sampling\.sampler\.karras: karras=True only applies"):
        instantiate(cfg.callbacks.sampling)


@pytest.fixture
def module(tmp_path):
    """The tiny model with random weights (a fresh U-Net predicts 0 everywhere, whatever the noise levels)."""
    module = build_diffusion_module(compose_train(tmp_path, TINY_MODEL + ["module.ema_decay=null"]))
    randomize(module.unet, 1)
    return module


def test_sampling_callback_uses_karras_sigmas(tmp_path, module, monkeypatch):
    """The grid of a karras=true run is the direct pipeline call with Karras sigmas, not the one without."""
    seen = []  # every Karras sigma ramp drawn
    real = samplers.karras_sigmas

    def recording_karras_sigmas(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(samplers, "karras_sigmas", recording_karras_sigmas)

    def grid(karras: bool):
        cfg = compose_train(tmp_path, ["callbacks=default", "sampler=dpmpp_2m", f"sampler.karras={karras}",
                                       "sampler.steps=4", "+callbacks.sampling.resolution=16",
                                       f"callbacks.sampling.prompts=[{','.join(PROMPTS)}]"])
        callback = instantiate(cfg.callbacks.sampling)
        trainer = SimpleNamespace(global_step=int(karras), default_root_dir=str(tmp_path / str(karras)), loggers=[],
                                  datamodule=None)
        with Image.open(callback.sample_grid(trainer, module)) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy())

    karras_grid = grid(True)
    assert len(seen) == 1 and len(seen[0]) == 4  # the callback's run drew Karras sigmas for its 4 steps
    bundle = module.bundle()
    direct = text_to_image(bundle, PROMPTS, sampler="dpmpp_2m", karras=True, steps=4, guidance_scale=3.0, seed=0,
                           height=16, width=16)
    assert torch.equal(seen[1], seen[0])  # the direct call: the same sigmas
    plain = text_to_image(bundle, PROMPTS, sampler="dpmpp_2m", karras=False, steps=4, guidance_scale=3.0, seed=0,
                          height=16, width=16)
    assert len(seen) == 2 and (direct - plain).abs().max() > 1e-3

    from ldm.pipelines.images import labelled_grid, to_pil
    from ldm.training.callbacks.sampling import SamplingCallback

    def as_grid(images):
        pil = labelled_grid(to_pil(images), labels=PROMPTS, scale=SamplingCallback.grid_scale(images))
        return torch.from_numpy(np.asarray(pil.convert("RGB")).copy())

    assert torch.equal(karras_grid, as_grid(direct))
    assert not torch.equal(karras_grid, as_grid(plain))
    assert torch.equal(grid(False), as_grid(plain)) and len(seen) == 2  # karras=false draws none
