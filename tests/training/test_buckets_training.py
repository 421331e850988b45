"""A folder of mixed aspect ratios trains with aspect-ratio buckets (from the automatic latent cache, latents of
several shapes), samples each caption at its bucket size in the grid, records the buckets in the checkpoint,
resumes mid-epoch exactly, and sample.py draws a non-square image from the checkpoint."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ldm.training.run.train import train
from tests.helpers.training import BUCKETS, RecordSeen, assert_same_run

ROOT = Path(__file__).resolve().parents[2]
FAST = ["callbacks=default", "callbacks.sampling.every_n_steps=0", "sampler.steps=2", "callbacks.sampling.n_prompts=4",
        "callbacks.prompt_accuracy=null", "callbacks.checkpoint.every_n_train_steps=1"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """15 images: 6 wide (48x16, ratio 3 -> bucket (24, 8)), 5 tall (16x48 -> (8, 24)), 4 square (20x20 -> (16, 16))."""
    root = tmp_path_factory.mktemp("mixed")
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate([(48, 16)] * 6 + [(16, 48)] * 5 + [(20, 20)] * 4):
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(["a wide picture", "a tall picture", "a square picture"][
            0 if size[0] > size[1] else 1 if size[0] < size[1] else 2])
    return root


def test_mixed_folder_trains_with_buckets_and_samples_at_bucket_sizes(tiny_cfg, mixed, tmp_path, capsys):
    result = train(tiny_cfg(*BUCKETS, f"data.train.root={mixed}", f"++data.latent_cache={tmp_path / 'cache'}", *FAST))
    out = capsys.readouterr().out
    assert "aspect-ratio buckets" in out and "24 x 8" in out and "8 x 24" in out  # the table, logged
    assert "latent cache" in out
    assert "vae check (frozen first stage on" in out  # on the sampled images of the most common bucket size
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    recorded = ckpt["ldm"]["model"]
    assert recorded["resolution"] == 16 and recorded["buckets"]["max_area"] == 256
    assert recorded["buckets"]["table"] == [[8, 24], [8, 32], [16, 16], [24, 8], [32, 8]]
    assert sorted(map(tuple, recorded["buckets"]["buckets"])) == [(8, 24), (16, 16), (24, 8)]
    grid = Image.open(result["sample_grid"])
    assert grid.size[0] > grid.size[1] / 4  # a grid of (real, sample) pairs at their own sizes was written

    from ldm.pipelines.cli import register_configs, sample

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={result['last_checkpoint']}", f"out_dir={tmp_path / 'samples'}",
                                           "prompt='a wide picture'", "sampler.steps=2", "height=8", "width=24",
                                           "n_images=2"])
    paths = sample(cfg)
    assert Image.open(paths[0]).size == (24, 8)


def test_callback_samples_each_caption_at_its_bucket_size(tiny_cfg, mixed, tmp_path):
    from ldm.data.datamodule import ImageCaptionDataModule
    from ldm.data.image_folder import ImageFolderDataset
    from types import SimpleNamespace

    from ldm.training.callbacks.sampling import SamplingCallback, data_prompts

    dm = ImageCaptionDataModule(ImageFolderDataset(mixed, resolution=16, buckets={"enabled": True, "step": 8}),
                                val_fraction=0.4, seed=0)
    prompts, real, _ = data_prompts(SimpleNamespace(datamodule=dm), 6, seed=0)
    assert isinstance(real, list) and len({tuple(r.shape) for r in real}) > 1  # several bucket sizes
    cb = SamplingCallback(n_prompts=6)
    cb.prompts, cb.real_images = prompts, real
    assert cb.sample_sizes(None) == [tuple(r.shape[-2:]) for r in real]
    assert SamplingCallback(resolution=[8, 24]).sample_sizes(None) is None  # a configured size wins
    assert SamplingCallback(resolution=[8, 24]).resolution == (8, 24)


@pytest.mark.slow  # three short training runs (~20 s on an idle 2-core machine)
def test_resume_mid_epoch_with_buckets_is_exact(tiny_cfg, mixed, tmp_path):
    common = [*BUCKETS, f"data.train.root={mixed}", f"++data.latent_cache={tmp_path / 'cache'}", "callbacks=none",
              "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
              "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints", "+callbacks.checkpoint.save_last=true",
              "+callbacks.checkpoint.every_n_train_steps=1", "+logger.csv.flush_logs_every_n_steps=1",
              "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "module.ema_decay=0.9",
              "trainer.max_steps=7"]  # 12 training images: 5 batches of 3 or fewer per epoch; 7 steps cross one
    reference = tiny_cfg(*common, f"paths.run_dir={tmp_path / 'reference'}")
    train(reference)
    stopped = [*common, f"paths.run_dir={tmp_path / 'resumed'}"]
    train(tiny_cfg(*stopped, "trainer.max_steps=6"))  # stops mid-epoch 1: its batches are epoch 1's order, not 0's
    train(tiny_cfg(*stopped, "ckpt_path=last"))
    assert_same_run(tmp_path / "reference", tmp_path / "resumed")


def test_bucket_step_must_be_a_multiple_of_the_models_downsampling(tiny_cfg, mixed):
    from ldm.training.run.config_checks import ConfigError, check_resolution

    check_resolution(tiny_cfg(*BUCKETS, f"data.train.root={mixed}"))  # step 8, the tiny model downsamples by 4
    with pytest.raises(ConfigError, match=r"data.train.buckets.step=6: the model downsamples by 4"):
        check_resolution(tiny_cfg(*BUCKETS, f"data.train.root={mixed}", "data.train.buckets.step=6"))


class RecordShapes(RecordSeen):
    """RecordSeen that also checks every batch is of one bucket (spawned processes pickle it: module level)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        assert len({tuple(s) for s in batch["target_size"].tolist()}) == 1
        assert list(batch["image"].shape[-2:]) == batch["target_size"][0].tolist()


@pytest.mark.slow  # two spawned processes
def test_two_process_ddp_ranks_split_the_bucket_batches(tiny_cfg, mixed, tmp_path):
    """2-process DDP (gloo): every batch of one bucket, the ranks' images disjoint and the whole epoch; 15 images in
    batches of 3: (24, 8) 6 -> 2 batches, (8, 24) 5 -> 2, (16, 16) 4 -> 2: 3 steps per rank, no padding."""
    import json

    import lightning as L
    from hydra.utils import instantiate

    from ldm.training.run.train import build_diffusion_module

    cfg = tiny_cfg(*BUCKETS, f"data.train.root={mixed}", "data.val_fraction=0", "trainer.limit_val_batches=0")
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[RecordShapes(str(tmp_path))])
    trainer.fit(build_diffusion_module(cfg), datamodule=instantiate(cfg.data))
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == list(range(15))  # disjoint, and the whole epoch
    a, b = (torch.load(tmp_path / f"unet{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_mmdit_trains_with_flow_matching_on_buckets(mixed, tmp_path):
    """SD3's denoiser on latents of several shapes: the cropped positional embedding takes each bucket's grid."""
    from tests.helpers.training import CKPT, MMDIT_TINY, compose_train

    shapes_only = ("data.train.size", "data.val.size", "data.val.resolution")
    overrides = [o for o in MMDIT_TINY if not o.startswith(shapes_only)] + CKPT
    result = train(compose_train(tmp_path, overrides + BUCKETS + [f"data.train.root={mixed}", "data.train.buckets.step=8",
                                                                 f"++data.latent_cache={tmp_path / 'cache'}"]))
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    assert ckpt["global_step"] == 3
    assert sorted(map(tuple, ckpt["ldm"]["model"]["buckets"]["buckets"])) == [(8, 24), (16, 16), (24, 8)]
