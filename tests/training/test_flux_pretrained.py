"""model=flux_dev model.pretrained=<a FLUX.1 diffusers folder>: the configured networks filled from the folder (made
tiny here to match a tiny FluxPipeline saved by diffusers), trained, the checkpoint sampled; a configured network
that is not the folder's (model=flux_tiny as it ships, or one changed field) is a clear error naming the key."""

import pytest
import torch

from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.data import write_captioned_noise
from tests.helpers.flux import flux_run as run
from tests.helpers.flux import write_tiny_flux_folder
from tests.helpers.training import CKPT, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(folder, pipeline, image folder): the tiny FLUX.1 folder and 6 captioned 16 px images."""
    tmp = tmp_path_factory.mktemp("flux_train")
    folder, pipe = write_tiny_flux_folder(tmp)
    images = write_captioned_noise(tmp / "images")
    return folder, pipe, images


def test_the_module_starts_from_the_folders_weights(flux, tmp_path, monkeypatch):
    import ldm.formats.sd3_folder as sd3_folder
    from ldm.formats.flux_keys import flux_from_diffusers
    from ldm.models.text_encoder_flux import FluxTextEncoder

    folder, pipe, images = flux
    read = []
    real = sd3_folder.read_weights
    monkeypatch.setattr(sd3_folder, "read_weights", lambda sub, *a: read.append(sub.name) or real(sub, *a))
    module = build_diffusion_module(compose_train(tmp_path, run(folder, images)))
    # the text encoders were built from the folder itself (flux_dev's default): their weights are not read twice
    assert read == ["transformer"] and sd3_folder.built_from(module.text_encoder, folder)
    want = flux_from_diffusers(pipe.transformer.state_dict(), module.unet.config)
    assert all(torch.equal(v, want[k]) for k, v in module.unet.state_dict().items())
    vae = module.autoencoder
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    assert not any("quant_conv" in k for k in vae.state_dict())
    assert torch.equal(vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    te = module.text_encoder
    assert isinstance(te, FluxTextEncoder) and torch.equal(te.t5.shared.weight, pipe.text_encoder_2.shared.weight)


def test_a_configured_network_that_is_not_the_folders_is_named(flux, tmp_path):
    from ldm.formats.flux_folder import load_flux_folder_into
    from ldm.formats.safe_load import CheckpointError
    from ldm.models.text_encoder_sd3 import SD3TextEncoder

    folder, _, images = flux
    with pytest.raises(ConfigError, match="model.unet.num_layers=2 but the folder's 1"):
        build_diffusion_module(compose_train(tmp_path, run(folder, images, "model.unet.num_layers=2")))
    with pytest.raises(ConfigError, match="model.autoencoder.norm_groups=4 but the folder's 8"):
        build_diffusion_module(compose_train(tmp_path, run(folder, images, "model.autoencoder.norm_groups=4")))
    # model=flux_tiny as it ships (4-channel shapes VAE, 2 + 2 blocks, the tiny SD3 text encoder): its Flux first
    with pytest.raises(ConfigError, match="model.unet.in_channels=4 but the folder's 16"):
        build_diffusion_module(compose_train(tmp_path, run(folder, images, model="flux_tiny", tiny=False)))
    # a text encoder that is not FLUX.1's: the key to set
    module = build_diffusion_module(compose_train(tmp_path, run(folder, images)))
    sd3_text = SD3TextEncoder.from_tiny(folder=str(tmp_path / "clips"), joint_dim=96, t5_length=8)
    with pytest.raises(CheckpointError, match="model.text_encoder._target_=ldm.models.text_encoder_flux"):
        load_flux_folder_into(folder, module.unet, module.autoencoder, sd3_text)


def test_flux_trains_from_the_folder_and_its_checkpoint_samples(flux, tmp_path):
    from hydra import compose, initialize_config_dir

    from ldm.formats.load import load_bundle
    from ldm.models.flux import Flux
    from ldm.models.text_encoder_flux import FluxTextEncoder
    from ldm.pipelines import text_to_image
    from ldm.pipelines.cli import register_configs, sample
    from tests.helpers import CONFIGS

    folder, pipe, images = flux
    full = train(compose_train(tmp_path / "full", run(folder, images, "optim.lr=1e-3", *CKPT)))
    assert full["global_step"] == 2 and full["metrics"]["train/loss"] > 0 and "val/loss" in full["metrics"]
    # its checkpoint rebuilds through the bounded builders (the Flux, the VAE, FluxTextEncoder of the folder)
    bundle = load_bundle(full["last_checkpoint"], device="cpu", dtype="float32")
    assert isinstance(bundle.unet, Flux) and isinstance(bundle.text_encoder, FluxTextEncoder)
    before = pipe.transformer.state_dict()["proj_out.weight"]
    assert not torch.equal(bundle.unet.final_layer.linear.weight, before)  # it trained
    images_out = text_to_image(bundle, ["a red circle"], sampler="flow_euler", steps=2, guidance_scale=3.5,
                               height=16, width=16, seed=0)
    assert images_out.shape == (1, 3, 16, 16) and torch.isfinite(images_out).all()

    lora = train(compose_train(tmp_path / "lora", run(folder, images, "adapter=lora", "optim.lr=1e-2", *CKPT)))
    assert lora["global_step"] == 2
    lora_file = tmp_path / "lora" / "run" / "lora.safetensors"
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={folder}", f"out_dir={tmp_path / 'png'}", "prompt=a red circle",
                                           "n_images=1", "sampler=flow_euler", "sampler.steps=2", "guidance_scale=3.5",
                                           f"lora=[{lora_file}]"])
    assert [p.name for p in sample(cfg)] == ["00000.png", "grid.png"]


# black-forest-labs/FLUX.1-dev vae/config.json (FLUX.1-schnell's is the same)
FLUX_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
            "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 2,
            "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
            "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "use_post_quant_conv": False, "use_quant_conv": False}


@pytest.mark.parametrize("model", ["flux_dev", "flux_schnell"])
def test_the_presets_vae_is_flux1s_vae(tmp_path, model):
    """model=flux_dev / flux_schnell's autoencoder is the one FLUX.1's vae/config.json describes (no quant convs,
    0.3611 / 0.1159): model.pretrained=<the real folder> passes the config check (built on the meta device)."""
    from hydra.utils import instantiate

    from ldm.formats.diffusers_keys import vae_config_from_diffusers
    from ldm.models.autoencoder import AutoencoderKL

    cfg = compose_train(tmp_path, [f"model={model}", "model.pretrained=x"])
    with torch.device("meta"):
        ours = instantiate(cfg.model.autoencoder)
        assert AutoencoderKL(**vae_config_from_diffusers(FLUX_VAE)).config == ours.config
    assert not any("quant_conv" in k for k in ours.state_dict())
