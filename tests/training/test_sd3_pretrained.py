"""model=sd35_medium experiment=sd3_finetune model.pretrained=<an SD3 diffusers folder>: the configured networks
filled from the folder (made tiny here to match a tiny folder saved by diffusers), trained (full and LoRA), their
checkpoints sampled; sample.py ckpt=<the folder>; a configured network that is not the folder's is a clear error."""

import pytest
import torch

from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.data import write_captioned_noise
from tests.helpers.sd3 import SD3_TINY_MODEL, write_tiny_sd3_folder
from tests.helpers.training import CKPT, FOLDER_RUN, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(folder, pipeline, image folder): the tiny SD3 folder (with T5) and 6 captioned 16 px images."""
    tmp = tmp_path_factory.mktemp("sd3_train")
    folder, pipe = write_tiny_sd3_folder(tmp, use_t5=True)
    images = write_captioned_noise(tmp / "images")
    return folder, pipe, images


def run(folder, images, *extra):
    return ["model=sd35_medium", "experiment=sd3_finetune", f"model.pretrained={folder}", f"data.train.root={images}",
            *SD3_TINY_MODEL, *FOLDER_RUN, *extra]


def test_the_module_starts_from_the_folders_weights(sd3, tmp_path, monkeypatch):
    import ldm.formats.sd3_folder as sd3_folder
    from ldm.formats.sd3_diffusers_keys import mmdit_from_diffusers

    folder, pipe, images = sd3
    read = []
    real = sd3_folder.read_weights
    monkeypatch.setattr(sd3_folder, "read_weights", lambda sub, *a: read.append(sub.name) or real(sub, *a))
    module = build_diffusion_module(compose_train(tmp_path, run(folder, images)))
    # the text encoders were built from the folder itself (the config's default): their weights are not read twice
    assert read == ["transformer"] and sd3_folder.built_from(module.text_encoder, folder)
    want = mmdit_from_diffusers(pipe.transformer.state_dict(), module.unet.config)
    assert all(torch.equal(v, want[k]) for k, v in module.unet.state_dict().items())
    vae = module.autoencoder
    assert vae.shift_factor == 0.0609 and not any("quant_conv" in k for k in vae.state_dict())
    te = module.text_encoder
    assert te.t5 is not None and torch.equal(te.t5.shared.weight, pipe.text_encoder_3.shared.weight)
    assert module.schedule.shift == 3.0  # experiment=sd3_finetune: SD3's shift


def test_a_configured_network_that_is_not_the_folders_is_named(sd3, tmp_path):
    folder, _, images = sd3
    with pytest.raises(ConfigError, match="model.unet.num_layers=3 but the folder's 2"):
        build_diffusion_module(compose_train(tmp_path, run(folder, images, "model.unet.num_layers=3")))
    with pytest.raises(ConfigError, match="model.autoencoder.norm_groups=4 but the folder's 8"):
        build_diffusion_module(compose_train(tmp_path, run(folder, images, "model.autoencoder.norm_groups=4")))


def test_sd3_finetune_trains_full_and_lora_from_the_folder_and_samples(sd3, tmp_path):
    from hydra import compose, initialize_config_dir

    from ldm.formats.load import load_bundle
    from ldm.models.mmdit import MMDiT
    from ldm.pipelines import text_to_image
    from ldm.pipelines.cli import register_configs, sample
    from tests.helpers import CONFIGS

    folder, _, images = sd3
    full = train(compose_train(tmp_path / "full", run(folder, images, *CKPT)))
    assert full["global_step"] == 2 and full["metrics"]["train/loss"] > 0 and "val/loss" in full["metrics"]
    # its checkpoint rebuilds through the bounded builders (the MMDiT, SD3's VAE, the folder's text encoders)
    bundle = load_bundle(full["last_checkpoint"], device="cpu", dtype="float32")
    assert isinstance(bundle.unet, MMDiT) and bundle.text_encoder.t5 is not None
    images_out = text_to_image(bundle, ["a red circle"], sampler="flow_euler", steps=2, guidance_scale=4.0,
                               height=16, width=16, seed=0)
    assert images_out.shape == (1, 3, 16, 16) and torch.isfinite(images_out).all()
    # the run exported as an SD3 diffusers folder: StableDiffusion3Pipeline loads it unchanged, same latents
    from diffusers import StableDiffusion3Pipeline

    from ldm.formats.exporter import export
    from tests.helpers.sd3 import pipeline_latents

    export(full["last_checkpoint"], "diffusers", tmp_path / "export")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "export")
    seen = []
    text_to_image(bundle, ["a red circle", "a blue square"], sampler="flow_euler", steps=3, guidance_scale=4.5,
                  height=16, width=16, seed=7, callback=lambda i, t, x, x0: seen.append(x))
    torch.testing.assert_close(seen[-1], pipeline_latents(pipe, ["a red circle", "a blue square"]), atol=1e-5,
                               rtol=0)

    lora = train(compose_train(tmp_path / "lora", run(folder, images, "adapter=lora", "optim.lr=1e-2", *CKPT)))
    assert lora["global_step"] == 2
    lora_file = tmp_path / "lora" / "run" / "lora.safetensors"
    assert lora_file.is_file()
    # the LoRA run's checkpoint: the adapter, its base taken from model.pretrained (the folder) again
    adapted = load_bundle(lora["last_checkpoint"], device="cpu", dtype="float32")
    assert isinstance(adapted.unet, MMDiT)

    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={folder}", f"out_dir={tmp_path / 'png'}", "prompt=a red circle",
                                           "n_images=1", "sampler=flow_euler", "sampler.steps=2",
                                           f"lora=[{lora_file}]"])
    written = sample(cfg)
    assert [p.name for p in written] == ["00000.png", "grid.png"]


@pytest.mark.parametrize("model", ["sd35_medium", "sd3_medium", "sd35_large"])
def test_sd3_finetune_without_weights_names_the_key(tmp_path, model):
    cfg = compose_train(tmp_path, [f"model={model}", "experiment=sd3_finetune", f"data.train.root={tmp_path}"])
    with pytest.raises(ConfigError, match="model.pretrained is not set"):
        build_diffusion_module(cfg)
    cfg = compose_train(tmp_path, [f"model={model}", "experiment=sd3_finetune", f"data.train.root={tmp_path}",
                                   f"model.pretrained={tmp_path / 'sd3.5_medium.safetensors'}"])
    with pytest.raises(ConfigError, match="sd3.5_medium.safetensors: no such file"):
        build_diffusion_module(cfg)


def test_the_module_starts_from_an_sd3_single_files_weights(sd3, tmp_path):
    """model.pretrained=<SD3 single file>: the MMDiT, VAE and text encoders filled from the file (its tokenizers
    and text-encoder architecture from model.text_encoder.path_or_hub_id)."""
    from ldm.formats.exporter import export
    from ldm.formats.load import load_bundle

    folder, _, images = sd3
    bundle = load_bundle(folder)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in (bundle.unet, bundle.autoencoder, bundle.text_encoder):
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    path = tmp_path / "sd3.safetensors"
    export(bundle, "single-file", path, allow_unloadable=True)
    module = build_diffusion_module(compose_train(tmp_path, run(path, images,
                                                               f"model.text_encoder.path_or_hub_id={folder}")))
    for name in ("unet", "autoencoder", "text_encoder"):
        theirs = getattr(module, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(bundle, name).state_dict().items()), name
