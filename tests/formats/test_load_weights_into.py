"""model.pretrained: one detector (detect_source) picks the reader that fills the configured modules."""

import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.formats.ldm_bundle import save_ldm_bundle
from ldm.formats.training_checkpoint import load_weights_into
from ldm.formats.single_file import save_single_file
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.unet import UNet


def tiny(clip_folder, seed):
    torch.manual_seed(seed)
    unet = UNet(model_channels=32, channel_mult=[1, 1], attention_levels=[1], num_heads=-1, num_head_channels=32,
                context_dim=32)
    for p in unet.parameters():
        p.data.normal_()
    return ModelBundle(unet, AutoencoderKL.from_preset("tiny"), CLIPTextEncoder.from_tiny("tiny", folder=clip_folder),
                       NoiseSchedule.make("scaled_linear"))


@pytest.mark.parametrize("kind", ["ldm_bundle", "sd_single_file"])
def test_fills_the_configured_modules(kind, tmp_path):
    source, target = tiny(tmp_path / "clip", 0), tiny(tmp_path / "clip", 1)
    path = (save_ldm_bundle(source, tmp_path / "bundle") if kind == "ldm_bundle"
            else save_single_file(tmp_path / "m.safetensors", source))
    assert load_weights_into(path, target.unet, target.autoencoder, target.text_encoder) == kind
    for a, b in zip(source.unet.state_dict().values(), target.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_missing_file_is_named(tmp_path):
    target = tiny(tmp_path / "clip", 1)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_weights_into(tmp_path / "nothing.safetensors", target.unet)
