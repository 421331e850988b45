"""diffusers-format folders: build our models from them, load into ours, write them back."""

import json

import pytest
import torch

from ldm.formats.diffusers_folder import load_diffusers_folder, read_scheduler_config, save_diffusers_folder
from ldm.formats.diffusers_keys import unet_diffusers_config, vae_diffusers_config
from ldm.formats.safe_load import CheckpointError
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_clip
from ldm.models.unet import UNet

diffusers = pytest.importorskip("diffusers")

SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "num_train_timesteps": 1000, "prediction_type": "v_prediction", "steps_offset": 1}

pytestmark = pytest.mark.usefixtures("one_thread")



def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A tiny diffusers model folder, written by diffusers itself."""
    root = write_tiny_clip(tmp_path_factory.mktemp("hub"))
    unet = randomize(diffusers.UNet2DConditionModel.from_config(
        unet_diffusers_config(UNet.from_preset("tiny").config, sample_size=8)), 1)
    vae_config = vae_diffusers_config(AutoencoderKL.from_preset("tiny").config)
    vae = randomize(diffusers.AutoencoderKL.from_config(vae_config), 2)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    diffusers.DDPMScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    return root, unet, vae


def check_same_outputs(ours_unet, ours_vae, unet, vae):
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    img = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours_unet.eval()(x, 5, ctx), unet(x, 5, ctx).sample, rtol=1e-4, atol=1e-5)
        want = vae.decode(vae.encode(img).latent_dist.mode()).sample
        torch.testing.assert_close(ours_vae.eval().decode(ours_vae.encode(img).mode()), want, rtol=1e-4, atol=1e-5)


def test_builds_our_models_from_folder(hub_folder):
    root, unet, vae = hub_folder
    out = load_diffusers_folder(root)
    assert isinstance(out["unet"], UNet) and isinstance(out["vae"], AutoencoderKL)
    assert isinstance(out["text_encoder"], CLIPTextEncoder)
    assert out["unet"].config == UNet.from_preset("tiny").config
    assert out["vae"].config == AutoencoderKL.from_preset("tiny").config
    check_same_outputs(out["unet"], out["vae"], unet, vae)
    assert out["text_encoder"](["a red circle"]).shape == (1, 77, 32)
    assert out["scheduler"] == {**SCHEDULER, "timestep_spacing": "leading", "clip_sample": True,
                                "rescale_betas_zero_snr": False}


def test_loads_into_given_models_strictly(hub_folder, tmp_path):
    root, unet, vae = hub_folder
    out = load_diffusers_folder(root, unet=UNet.from_preset("tiny"), vae=AutoencoderKL.from_preset("tiny"),
                                components=("unet", "vae"))
    assert out["text_encoder"] is None
    check_same_outputs(out["unet"], out["vae"], unet, vae)
    with pytest.raises(CheckpointError, match=r"unet(.|\n)*mis-shaped(.|\n)*attn2.to_k.weight"):
        load_diffusers_folder(root, unet=UNet.from_preset("tiny", context_dim=16), components=("unet",))
    with pytest.raises(CheckpointError, match="no vae/ folder"):
        load_diffusers_folder(tmp_path, vae=AutoencoderKL.from_preset("tiny"))


def test_bin_weights_and_missing_weights(hub_folder, tmp_path):
    _, unet, _ = hub_folder
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(unet.config)))
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors or .*bin"):
        load_diffusers_folder(tmp_path)
    torch.save(unet.state_dict(), tmp_path / "unet" / "diffusion_pytorch_model.bin")
    out = load_diffusers_folder(tmp_path)
    assert out["vae"] is None and out["text_encoder"] is None
    assert torch.equal(out["unet"].state_dict()["input_blocks.0.0.weight"], unet.state_dict()["conv_in.weight"])
    assert read_scheduler_config(tmp_path)["beta_schedule"] == "linear"  # defaults without scheduler/


def test_save_is_readable_by_diffusers_and_transformers(hub_folder, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    root, _, _ = hub_folder
    ours = load_diffusers_folder(root)
    save_diffusers_folder(tmp_path, ours["unet"], ours["vae"], ours["text_encoder"], ours["scheduler"], sample_size=8)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    check_same_outputs(ours["unet"], ours["vae"], unet, vae)
    sched = diffusers.DDPMScheduler.from_pretrained(tmp_path / "scheduler")
    assert sched.config.prediction_type == "v_prediction" and sched.config.beta_schedule == "scaled_linear"
    te = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = tok(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, ours["text_encoder"].tokenize(["a red circle"]))
    with torch.no_grad():
        torch.testing.assert_close(te(ids).last_hidden_state, ours["text_encoder"](["a red circle"]))
    again = load_diffusers_folder(tmp_path)
    assert again["scheduler"] == ours["scheduler"]
