"""sample.py's tests: a tiny random SD single file to sample from, and configs/sample.yaml composed as the command
line would compose it."""

import pytest
from hydra import compose, initialize_config_dir

from ldm.diffusion.schedules import NoiseSchedule
from ldm.formats.bundle import ModelBundle
from ldm.formats.single_file import save_single_file
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_clip
from ldm.models.unet import UNet
from ldm.pipelines.cli import register_configs
from tests.helpers import CONFIGS
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
