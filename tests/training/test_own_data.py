"""A user's own folder: the VAE check at the start, samples of the data's own captions beside their real images,
and experiment=own_data's two stages (a VAE fit to the folder, then the diffusion model on its latents)."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ldm.data.datamodule import ImageCaptionDataModule
from ldm.data.image_folder import ImageFolderDataset
from ldm.tasks.glyphs.dataset import write_glyph_folder
from ldm.training.callbacks.sampling import data_prompts
from ldm.training.run.train import train

FAST = ["data.num_workers=0", "callbacks.sampling.every_n_steps=0", "sampler.steps=2",
        "callbacks.sampling.n_prompts=3", "callbacks.prompt_accuracy=null", "callbacks.checkpoint.every_n_train_steps=3"]


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    return write_glyph_folder(tmp_path_factory.mktemp("glyphs"), n=30, resolution=16, seed=0)


def test_sampling_prompts_are_drawn_from_the_validation_captions(glyphs):
    dm = ImageCaptionDataModule(ImageFolderDataset(glyphs, resolution=16), val_fraction=0.3, seed=0)
    trainer = SimpleNamespace(datamodule=dm)
    prompts, real, _ = data_prompts(trainer, 4, seed=0)
    val = {dm.val_dataset[i]["caption"]: dm.val_dataset[i]["image"] for i in range(len(dm.val_dataset))}
    assert len(prompts) == 4 and set(prompts) <= set(val)
    train_only = {dm.train_dataset[i]["caption"] for i in range(len(dm.train_dataset))} - set(val)
    assert not set(prompts) & train_only
    assert real.shape == (4, 3, 16, 16)
    assert any(torch.equal(real[0], im) for im in val.values())
    assert data_prompts(trainer, 4, seed=0)[0] == prompts  # seeded
    assert data_prompts(trainer, 4, seed=1)[0] != prompts
    no_val = SimpleNamespace(datamodule=ImageCaptionDataModule(ImageFolderDataset(glyphs, resolution=16)))
    assert len(data_prompts(no_val, 5, seed=0)[0]) == 5  # no validation split: training captions


def test_folder_run_samples_its_captions_at_its_resolution_beside_real_images(tiny_cfg, glyphs, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.training"):
        result = train(tiny_cfg("data=folder", f"data.train.root={glyphs}", "data.val_fraction=0.2",
                                "callbacks=default", *FAST))
    # the fresh tiny VAE cannot reproduce the glyphs: the check says so and names the fix
    assert result["vae_check"]["poor"] and "experiment=own_data" in caplog.text
    grid = Image.open(result["sample_grid"])
    tile = 16 * (96 // 16) + 2  # 16 px samples (not 512: the data's resolution) enlarged 6x, 2 px apart
    assert grid.size[0] == 4 * tile + 2 and grid.size[1] > 2 * tile  # 3 (real, sample) pairs, 2 per row
    run = Path(result["run_dir"])
    assert "images_per_sec" in result and (run / "samples").is_dir()


def test_own_data_trains_a_vae_first_then_reuses_it(tiny_cfg, glyphs, capsys):
    overrides = ["experiment=own_data", f"data.train.root={glyphs}", "data.batch_size=4",
                 "first_stage.max_steps=2", "first_stage.batch_size=4", "first_stage.autoencoder.preset=tiny",
                 "+first_stage.autoencoder.norm_groups=8",
                 "callbacks=default", *FAST]
    result = train(tiny_cfg(*overrides))
    weights = Path(result["run_dir"]) / "first_stage" / "autoencoder.safetensors"
    assert weights.is_file() and (weights.parent / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    assert ckpt["ldm"]["model"]["model"]["autoencoder"]["weights"] == str(weights)
    from ldm.training.build.factories import autoencoder

    vae = autoencoder(weights=str(weights))
    assert vae.config["base_channels"] == 16 and vae.scaling_factor != 1.0  # first_stage's model, calibrated
    for k, v in vae.state_dict().items():  # the diffusion run froze exactly that VAE
        assert torch.equal(ckpt["state_dict"][f"autoencoder.{k}"], v), k
    assert "first stage: training a VAE" in capsys.readouterr().out
    mtime = weights.stat().st_mtime_ns
    train(tiny_cfg(*overrides))  # the same run folder: stage 1 is not trained again
    assert "first stage: reusing" in capsys.readouterr().out and weights.stat().st_mtime_ns == mtime


def test_first_stage_with_given_weights_is_skipped(tiny_cfg, glyphs, tmp_path):
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.formats.autoencoder_file import save_autoencoder

    own = save_autoencoder(AutoencoderKL.from_preset("tiny"), tmp_path / "mine.safetensors")
    result = train(tiny_cfg("experiment=own_data", f"data.train.root={glyphs}", "data.batch_size=4",
                            f"model.autoencoder.weights={own}", "trainer.max_steps=1", "callbacks=none",
                            "data.num_workers=0"))
    assert not (Path(result["run_dir"]) / "first_stage").exists()


def test_first_stage_errors_name_its_keys(tiny_cfg, glyphs):
    from ldm.training.run.train import ConfigError

    with pytest.raises(ConfigError, match="first_stage.max_steps"):
        train(tiny_cfg("experiment=own_data", f"data.train.root={glyphs}", "first_stage.max_steps=null",
                       "callbacks=none"))
    with pytest.raises(ConfigError, match="^first_stage.autoencoder: .*norm_groups"):
        train(tiny_cfg("experiment=own_data", f"data.train.root={glyphs}", "first_stage.autoencoder.preset=tiny",
                       "callbacks=none"))


def test_vae_stages_of_both_experiments_build(tiny_cfg, glyphs, tmp_path):
    """experiment=shapes_vae and own_data's first stage build their autoencoder module (a diffusion-only key such
    as module.min_snr_gamma in train.yaml once broke the former)."""
    from ldm.training.run.first_stage import first_stage_config
    from ldm.training.run.train import build_autoencoder_module

    assert build_autoencoder_module(tiny_cfg("experiment=shapes_vae", tiny=False)) is not None
    cfg = tiny_cfg("experiment=own_data", f"data.train.root={glyphs}", tiny=False)
    sub = first_stage_config(cfg, tmp_path)
    assert sub.stage == "autoencoder" and sub.data.batch_size == cfg.first_stage.batch_size
    assert sub.data.latent_cache is None and sub.paths.run_dir == str(tmp_path / "first_stage")
    assert build_autoencoder_module(sub).autoencoder.config["base_channels"] == 16


def test_auto_defaults_follow_the_data_size(tiny_cfg, glyphs):
    from ldm.training.run.auto_defaults import batch_size, max_steps, resolve_auto, sampling_every

    assert (batch_size(1960, 8, cuda=False), max_steps(1960, 64), sampling_every(1000)) == (64, 1000, 250)
    assert batch_size(200, 8, cuda=False) == 20 and max_steps(200_000, 64) == 20_000  # a tenth; the cap
    assert batch_size(10_000, 64, cuda=False) == 4 and max_steps(None, 8) == 1200  # SD-size latents; a stream
    cfg = tiny_cfg("experiment=own_data", f"data.train.root={glyphs}", "data.train.resolution=16",
                   "data.batch_size=auto",
                   "trainer.max_steps=auto", "callbacks=default", "callbacks.sampling.every_n_steps=auto", tiny=False)
    chosen = resolve_auto(cfg)
    # 30 glyphs, 2% held out -> 29 training items: batch max(4, 29 // 10) = 4; 30 epochs < 1,000 steps -> 1,000
    assert chosen == {"data.batch_size": 4, "trainer.max_steps": 1000, "callbacks.sampling.every_n_steps": 250}
    assert cfg.data.batch_size == 4 and cfg.trainer.max_steps == 1000
    fixed = tiny_cfg("experiment=own_data", f"data.train.root={glyphs}", "data.train.resolution=16",
                     "data.batch_size=16",
                     "trainer.max_steps=77", "callbacks=default", "callbacks.sampling.every_n_steps=10", tiny=False)
    assert resolve_auto(fixed) == {} and fixed.data.batch_size == 16 and fixed.trainer.max_steps == 77
