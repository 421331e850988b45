import functools

from ldm.data.resumable_sampler import ResumableSampler

import lightning as L
import pytest
import torch
from torch.utils.data import RandomSampler

from ldm.data.datamodule import ImageCaptionDataModule
from ldm.data.webdataset import WebDatasetSource
from ldm.tasks.shapes.dataset import ShapesDataset


def indices(loader):
    return [i for batch in loader for i in batch["index"].tolist()]


def test_batches_have_the_common_format():
    dm = ImageCaptionDataModule(ShapesDataset(size=10, resolution=16), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert dm.val_dataloader() == []


def test_val_split_is_disjoint_and_deterministic():
    def split(seed):
        dm = ImageCaptionDataModule(ShapesDataset(size=50, resolution=8), val_fraction=0.2, batch_size=5, seed=seed)
        dm.setup("fit")
        return indices(dm.train_dataloader()), indices(dm.val_dataloader())

    train, val = split(0)
    assert len(val) == 10 and len(train) == 40
    assert not set(train) & set(val) and set(train) | set(val) == set(range(50))
    assert split(0) == (train, val)
    assert set(split(1)[1]) != set(val)


def test_shuffle_is_seeded_and_changes_per_epoch():
    dm = ImageCaptionDataModule(ShapesDataset(size=12, resolution=8), batch_size=3, seed=3)
    loader = dm.train_dataloader()
    first = indices(loader)
    loader.sampler.set_epoch(1)  # Lightning calls this at every epoch start
    second = indices(loader)
    assert sorted(first) == list(range(12)) and first != second
    again = ImageCaptionDataModule(ShapesDataset(size=12, resolution=8), batch_size=3, seed=3).train_dataloader()
    assert indices(again) == first
    assert isinstance(loader.sampler, ResumableSampler)


def test_factory_and_explicit_val():
    factory = functools.partial(ShapesDataset, size=6, resolution=8)
    dm = ImageCaptionDataModule(factory, val=functools.partial(ShapesDataset, size=4, resolution=8, seed=9), batch_size=2)
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 4
    assert indices(dm.val_dataloader()) == [0, 1, 2, 3]


def test_iterable_dataset_with_workers(tmp_path, images):
    import webdataset as wds

    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"{s}.tar")) as sink:
            for j in range(4):
                sink.write({"__key__": f"{s}_{j}", "png": images.bytes(), "txt": "c"})
    source = WebDatasetSource(str(tmp_path / "{0..1}.tar"), resolution=8, shuffle_buffer=4)
    dm = ImageCaptionDataModule(source, batch_size=2, num_workers=2, persistent_workers=True)
    loader = dm.train_dataloader()
    assert loader.sampler is not None and not isinstance(loader.sampler, RandomSampler)
    assert sum(len(b["caption"]) for b in loader) == 8
    with pytest.raises(ValueError, match="map-style"):
        ImageCaptionDataModule(source, val_fraction=0.1).setup("fit")


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"batch_size": -2}, "batch_size"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"num_workers": -1}, "num_workers"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageCaptionDataModule(ShapesDataset(size=4), **kwargs)


def test_bad_train_argument():
    with pytest.raises(TypeError, match="Dataset or a callable"):
        ImageCaptionDataModule(42).setup()


class _TinyModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Conv2d(3, 3, 1)

    def training_step(self, batch, batch_idx):
        assert isinstance(batch["caption"], list)
        return self.layer(batch["image"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch["image"]).pow(2).mean(), batch_size=len(batch["caption"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit(tmp_path):
    dm = ImageCaptionDataModule(ShapesDataset(size=16, resolution=8), val_fraction=0.25, batch_size=4)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(_TinyModel(), datamodule=dm)
    assert trainer.global_step == 3
