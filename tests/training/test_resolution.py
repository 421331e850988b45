"""The training resolution travels: whatever the data source, the checkpoint records it and sample.py uses it as
the default size (not SD's 512)."""

import pytest
import torch
from PIL import Image

from ldm.pipelines.cli import sample
from ldm.training.run.train import train
from tests.helpers.training import TINY_MODEL, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")
CKPT = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"]


def sampled_size(checkpoint, tmp_path) -> tuple[int, int]:
    paths = sample({"ckpt": str(checkpoint), "prompt": "a letter k", "sampler": {"steps": 2}, "device": "cpu",
                    "out_dir": str(tmp_path / "samples"), "grid": False})
    return Image.open(paths[0]).size


def recorded_resolution(checkpoint) -> int:
    return torch.load(checkpoint, weights_only=True)["ldm"]["model"]["resolution"]


def test_a_folder_trained_checkpoint_samples_at_its_training_resolution(tiny_cfg, tmp_path):
    root = tmp_path / "letters"
    root.mkdir()
    for i in range(6):  # 40 px images, trained at 16 (the folder config's own default is 256)
        Image.new("RGB", (40, 40), (255, 255, 255)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a letter {'abc'[i % 3]}")
    result = train(tiny_cfg("data=folder", f"data.train.root={root}", "data.train.resolution=16",
                            "data.num_workers=0", "data.val_fraction=0.2", "++data.latent_cache=${paths.cache_dir}/l", *CKPT))
    assert recorded_resolution(result["last_checkpoint"]) == 16
    assert sampled_size(result["last_checkpoint"], tmp_path) == (16, 16)


def test_a_latent_cache_checkpoint_records_and_samples_at_the_images_resolution(tmp_path):
    from ldm.data.latent_cache import build_latent_cache
    from ldm.tasks.shapes.dataset import ShapesDataset
    from ldm.models.autoencoder import AutoencoderKL

    build_latent_cache(ShapesDataset(size=12, resolution=24), tmp_path / "cache", AutoencoderKL.from_preset("tiny"),
                       None, batch_size=6, progress=False)
    overrides = [o for o in TINY_MODEL if not o.startswith("data.train.resolution")]  # a cache has no such key
    result = train(compose_train(tmp_path, overrides + ["data=latent_cache", f"data.train.path={tmp_path / 'cache'}",
                                                        "data.num_workers=0", "data.val_fraction=0.2", *CKPT]))
    assert recorded_resolution(result["last_checkpoint"]) == 24  # 12x12 latents x the tiny VAE's factor 2
    assert sampled_size(result["last_checkpoint"], tmp_path) == (24, 24)


def test_callbacks_sample_at_the_recorded_resolution_else_the_sources(tmp_path):
    from types import SimpleNamespace

    from ldm.data.datamodule import ImageCaptionDataModule
    from ldm.data.image_folder import ImageFolderDataset
    from ldm.training.callbacks.sampling import data_resolution

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    dm = ImageCaptionDataModule(ImageFolderDataset(tmp_path, resolution=24))
    dm.setup("fit")
    recorded = SimpleNamespace(lightning_module=SimpleNamespace(model_config={"resolution": 16}), datamodule=dm)
    assert data_resolution(recorded) == 16
    unrecorded = SimpleNamespace(lightning_module=SimpleNamespace(model_config={}), datamodule=dm)
    assert data_resolution(unrecorded) == 24, "an image folder knows its resolution (it was 512 before)"
