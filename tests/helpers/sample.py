"""sample.py's tests: a tiny random SD single file to sample from, and configs/sample.yaml composed as the command
line would compose it."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from hydra import compose, initialize_config_dir

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.formats.single_file import save_single_file
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_clip
from ldm.models.unet import UNet
from ldm.pipelines.cli import register_configs
from tests.helpers import CONFIGS, ROOT
from tests.helpers.models import randomize


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random SD-layout single file (training resolution 16 in its header) and a tiny CLIP folder."""
    root = tmp_path_factory.mktemp("model")
    clip = write_tiny_clip(root / "clip")
    bundle = ModelBundle(randomize(UNet.from_preset("tiny"), 1), randomize(AutoencoderKL.from_preset("tiny"), 2),
                         CLIPTextEncoder.from_pretrained(clip), NoiseSchedule.make("scaled_linear"))
    return save_single_file(root / "tiny.safetensors", bundle, resolution=16), clip


def config(model, out_dir, *overrides):
    """configs/sample.yaml + overrides, composed as `python sample.py ...` would."""
    ckpt, clip = model
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("sample", overrides=[f"ckpt={ckpt}", f"text_encoder={clip}", f"out_dir={out_dir}",
                                            "sampler.steps=3", *overrides])


def ckpt_config(ckpt, out_dir, *overrides):
    """configs/sample.yaml + overrides for a model that names its own text encoder (one of our training
    checkpoints), composed as `python sample.py ckpt=... ...` would."""
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("sample", overrides=[f"ckpt={ckpt}", f"out_dir={out_dir}", "sampler.steps=2", *overrides])


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 16x16 RGB image and a mask (white square = repaint) as PNG files, plus a mask of the wrong size."""
    root = tmp_path_factory.mktemp("pictures")
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(root / "init.png")
    mask = torch.zeros(16, 16, dtype=torch.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask.numpy()).save(root / "mask.png")
    Image.fromarray(mask[:8, :8].numpy()).save(root / "small_mask.png")
    Image.fromarray(np.zeros((18, 16, 3), np.uint8)).save(root / "odd.png")  # height 18: not a multiple of 4
    return root


def no_loader(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad input was caught")


@pytest.fixture(scope="module")
def export_folder(model, tmp_path_factory):
    """Our diffusers export of the tiny model, written by the real command line."""
    ckpt, clip = model
    out = tmp_path_factory.mktemp("export") / "diffusers"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "ldm.cli.export", str(ckpt), "--format", "diffusers", "--out", str(out),
                          "--text-encoder", str(clip)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    return out
