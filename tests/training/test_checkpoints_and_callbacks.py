"""Training checkpoints load back as a ModelBundle (EMA by default); the sampling callback writes a grid."""

import pytest
import torch

from ldm.formats.training_checkpoint import load_training_checkpoint
from ldm.training.run.train import train

CKPT = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"]
SAMPLING = ["+callbacks.sampling._target_=ldm.training.callbacks.sampling.SamplingCallback",
            "+callbacks.sampling.prompts=[a red circle,a blue square]", "+callbacks.sampling.every_n_steps=2",
            "+callbacks.sampling.sampler.steps=3", "+callbacks.sampling.guidance_scale=2.0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.helpers.training import TINY_MODEL, compose_train

    tmp = tmp_path_factory.mktemp("run")
    cfg = compose_train(tmp, TINY_MODEL + CKPT + SAMPLING + ["module.ema_decay=0.9", "data.val.resolution=16"])
    return train(cfg)


def test_checkpoint_round_trip_with_ema(trained):
    ckpt = torch.load(trained["last_checkpoint"], weights_only=True)
    ema = load_training_checkpoint(trained["last_checkpoint"])
    raw = load_training_checkpoint(trained["last_checkpoint"], use_ema=False)
    for k, v in ema.unet.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"ema.model.{k}"])
    for k, v in raw.unet.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"unet.{k}"])
    assert any(not torch.equal(a, b) for a, b in zip(ema.unet.state_dict().values(), raw.unet.state_dict().values()))
    assert ema.meta["ema"] and not raw.meta["ema"]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    assert ema.unet(x, t, ema.text_encoder(["a red circle"])).shape == (1, 4, 8, 8)


def test_sampling_callback_writes_grids(trained):
    from PIL import Image

    grid = trained["sample_grid"]
    assert grid.endswith("step_000003.png")
    img = Image.open(grid)
    assert img.size[0] > 16 * 2 and img.size[1] > 16
    run = trained["run_dir"]
    import pathlib

    assert sorted(p.name for p in (pathlib.Path(run) / "samples").glob("*.png")) == ["step_000002.png",
                                                                                     "step_000003.png"]


def test_refuses_non_checkpoint(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"garbage")
    from ldm.formats.safe_load import CheckpointError

    with pytest.raises(CheckpointError, match="x.ckpt"):
        load_training_checkpoint(bad)


def test_dataset_epoch_callback_advances_iterable_datasets():
    from types import SimpleNamespace

    from torch.utils.data import IterableDataset

    from ldm.training.callbacks.data import DatasetEpochCallback

    class Shards(IterableDataset):
        epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(())

    ds = Shards()
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_dataset=ds), current_epoch=3)
    DatasetEpochCallback().on_train_epoch_start(trainer, None)
    assert ds.epoch == 3
