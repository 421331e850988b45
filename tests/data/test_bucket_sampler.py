"""Bucket batches (ldm.data.bucket_sampler): one bucket per batch, every image once per epoch (a small bucket gives
one smaller batch), the order from (seed, epoch), disjoint DDP shards that cover the epoch, exact mid-epoch skip;
the datamodule's loaders and the latent cache with latents of several shapes."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ldm.data import bucket_sampler
from ldm.data.auto_cache import cache_spec, sync_cache
from ldm.data.bucket_sampler import BucketBatchSampler
from ldm.data.datamodule import ImageCaptionDataModule
from ldm.data.image_folder import ImageFolderDataset

# 7 images in bucket 0, 2 in bucket 1 (fewer than a batch), 4 in bucket 2
BUCKET_OF = [0, 2, 0, 1, 0, 2, 0, 0, 2, 1, 0, 2, 0]


def on_rank(monkeypatch, rank, world):
    monkeypatch.setattr(bucket_sampler, "_rank_world", lambda: (rank, world))


def test_batches_of_one_bucket_cover_the_epoch_small_bucket_smaller_batch():
    s = BucketBatchSampler(BUCKET_OF, batch_size=3, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 3 + 1 + 2  # ceil(7/3) + ceil(2/3) + ceil(4/3)
    for batch in batches:
        assert len({BUCKET_OF[i] for i in batch}) == 1
    assert sorted(i for b in batches for i in b) == list(range(len(BUCKET_OF)))  # each image once
    assert sorted(len(b) for b in batches) == [1, 1, 2, 3, 3, 3]  # bucket 1's 2 images: one batch of 2
    s.set_epoch(0)
    assert list(s) == batches  # the order is a function of (seed, epoch)
    s.set_epoch(1)
    assert list(s) != batches
    assert list(BucketBatchSampler(BUCKET_OF, 3, seed=1)) != batches
    assert [b for b in BucketBatchSampler(BUCKET_OF, 3, shuffle=False)][0] == [0, 2, 4]


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_ranks_get_disjoint_shards_covering_the_epoch(monkeypatch, world):
    s = BucketBatchSampler(BUCKET_OF, batch_size=3, seed=5)
    s.set_epoch(2)
    all_batches = s.batches()  # 6 batches
    shards = []
    for rank in range(world):
        on_rank(monkeypatch, rank, world)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == -(-6 // world)  # the same number of steps on every rank
    positions = [b for shard in shards for b in shard]
    assert {tuple(b) for b in positions} == {tuple(b) for b in all_batches}  # every batch (every image) covered
    # disjoint but for the padding: the first batches repeated to fill the last round (6 -> 8 with 4 ranks)
    assert len(positions) - len(all_batches) == (-6) % world
    assert sorted(map(tuple, positions)) == sorted(map(tuple, all_batches + all_batches[: (-6) % world]))


@pytest.mark.parametrize("world", [1, 2])
def test_skip_resumes_exactly_mid_epoch(monkeypatch, world):
    for rank in range(world):
        on_rank(monkeypatch, rank, world)
        s = BucketBatchSampler(BUCKET_OF, batch_size=2, seed=3)
        s.set_epoch(4)
        full = list(s)
        for done in range(len(full) + 1):
            s.skip(done)
            assert list(s) == full[done:]
            assert list(s) == full  # a skip applies to one iteration only


def write_mixed(root, images, n_wide=5, n_tall=3, n_square=4):
    i = 0
    for size, n in (((64, 32), n_wide), ((24, 72), n_tall), ((40, 40), n_square)):
        for _ in range(n):
            images.save(root / f"{i:02d}.png", size=size, color=(20 * i, 100, 200 - 10 * i))
            (root / f"{i:02d}.txt").write_text(f"image {i}")
            i += 1


BUCKETS = {"enabled": True, "step": 16, "min_side": 16, "max_side": 64}


def test_datamodule_batches_carry_records_and_resume_mid_epoch(tmp_path, images, caplog):
    write_mixed(tmp_path, images)
    ds = ImageFolderDataset(tmp_path, resolution=32, buckets=BUCKETS)
    dm = ImageCaptionDataModule(ds, batch_size=2, num_workers=0, seed=1, val_fraction=0.25)
    full = list(dm.train_dataloader())
    shapes = {tuple(b["image"].shape[-2:]) for b in full}
    assert shapes == {(32, 32), (48, 16)}  # (64, 32) ties -> (32, 32); (24, 72) -> (16, 48)
    for b in full:
        assert b["target_size"].tolist() == [list(b["image"].shape[-2:])] * len(b["caption"])
        assert b["original_size"].shape == b["crop_top_left"].shape == (len(b["caption"]), 2)
    assert sorted(i for b in full for i in b["index"].tolist()) == sorted(dm.train_dataset.indices)
    val = list(dm.val_dataloader())  # validation batches are bucketed too, every image once
    assert sum(len(b["caption"]) for b in val) == len(dm.val_dataset)
    # a trainer resumed after 2 batches of epoch 0: the loader continues with the 3rd
    progress = SimpleNamespace(current=SimpleNamespace(ready=2))
    dm.trainer = SimpleNamespace(current_epoch=0, world_size=1, fit_loop=SimpleNamespace(
        restarting=True, epoch_loop=SimpleNamespace(batch_progress=progress)))
    resumed = list(dm.train_dataloader())
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in full[2:]]


class PoolEncoder:
    def __init__(self):
        self.shapes = []

    def __call__(self, images, captions, generator=None):
        self.shapes.append(tuple(images.shape[-2:]))
        mean = F.avg_pool2d(images, 2)
        return {"mean": mean, "logvar": torch.full_like(mean, -30.0)}


def test_latent_cache_holds_latents_of_several_shapes(tmp_path, images):
    root, folder = tmp_path / "images", tmp_path / "cache"
    write_mixed(root, images)
    ds = ImageFolderDataset(root, resolution=32, random_flip=True, buckets=BUCKETS)
    enc = PoolEncoder()
    view = sync_cache(folder, cache_spec(ds), enc, batch_size=4, progress=False, sample=False)
    assert set(enc.shapes) == {(32, 32), (48, 16)} and view.encoded == 2 * len(ds)  # both flips
    assert len(list(folder.glob("part-*"))) == 2  # one part per bucket
    assert view.bucket_assignment.bucket_of == ds.bucket_assignment.bucket_of
    for i in range(len(ds)):
        item, source = view[i], ds[i]
        h, w = source["image"].shape[-2:]
        assert item["latents"].shape == (3, h // 2, w // 2)
        assert item["target_size"] == source["target_size"] and item["original_size"] == source["original_size"]
        flipped = torch.allclose(item["latents"], F.avg_pool2d(source["image"].flip(-1)[None], 2)[0], atol=1e-5)
        straight = torch.allclose(item["latents"], F.avg_pool2d(source["image"][None], 2)[0], atol=1e-5)
        assert flipped or straight
        if flipped and not straight:  # the mirrored crop's offset is measured from the other edge
            resized_w = ds.bucket_assignment.resized[i][0]
            assert item["crop_top_left"][1] == resized_w - w - source["crop_top_left"][1]
    again = PoolEncoder()
    view = sync_cache(folder, cache_spec(ds), again, batch_size=4, progress=False, sample=False)
    assert again.shapes == [] and view.encoded == 0  # reused
    dm = ImageCaptionDataModule(ds, batch_size=3, num_workers=0)
    dm.setup()
    dm.train_dataset = view
    batches = list(dm.train_dataloader())
    assert sum(len(b["caption"]) for b in batches) == len(ds)
    assert {tuple(b["latents"].shape[-2:]) for b in batches} == {(16, 16), (24, 8)}


def test_webdataset_refuses_buckets():
    from ldm.data.webdataset import WebDatasetSource

    with pytest.raises(ValueError, match="data.train.buckets.*not supported for webdataset"):
        WebDatasetSource(["x.tar"], buckets={"enabled": True})


def test_lightning_sets_each_epoch_on_the_bucket_batches():
    """Lightning calls set_epoch on ``loader.sampler`` and ``loader.batch_sampler.sampler`` at every epoch start (not
    on a batch sampler): the bucket batches must reach it, or an uninterrupted run repeats epoch 0's order every
    epoch while a resumed one (whose loader is given its epoch) does not."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    batches = BucketBatchSampler([0, 1, 0, 1, 2, 2, 0, 1], batch_size=2, seed=3)
    loader = DataLoader(list(range(8)), batch_sampler=batches)
    orders = []
    for epoch in range(3):
        _set_sampler_epoch(loader, epoch)
        assert batches.epoch == epoch
        orders.append([b.tolist() for b in loader])
    assert orders[0] != orders[1] or orders[1] != orders[2]
