"""Mid-epoch resume of WebDatasetSource: a stream resumed from the position after k consumed batches yields exactly
the batches an uninterrupted pass yields after its first k, whatever the shuffle buffer, epoch_size, number of
workers, uneven shards or corrupt samples."""

import logging
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from ldm.data.collate import collate_image_caption
from ldm.data.datamodule import ImageCaptionDataModule
from ldm.data.webdataset import POSITION_KEY, WebDatasetSource

SHARD_SIZES = (7, 3, 5, 6, 2)  # uneven: with 2 workers one runs dry well before the other


def write_shards(folder, images, corrupt=True):
    """Five shards of different sizes with distinguishable images; one corrupt sample in shard 2."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(SHARD_SIZES):
        with wds.TarWriter(str(folder / f"shard-{s}.tar")) as sink:
            for j in range(n):
                key = f"s{s}_{j}"
                png = b"not a png" if corrupt and (s, j) == (2, 1) else images.bytes(size=(12, 10),
                                                                                     color=(20 * s, 30 * j, 90))
                sink.write({"__key__": key, "png": png, "txt": f"caption {key}"})
    return [str(folder / f"shard-{s}.tar") for s in range(len(SHARD_SIZES))]


def make_source(urls, **options):
    options = {"resolution": 8, "shuffle_buffer": 6, "seed": 3, **options}
    return WebDatasetSource(urls, **options)


def run(source, num_workers, batch_size=2, drop_last=True):
    """Iterate one pass the way the training loop does; returns [(keys, images, position after this batch)]."""
    loader = DataLoader(source, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                        collate_fn=source.tracking_collate(collate_image_caption))
    out = []
    for batch in loader:
        source.consume(batch)
        assert POSITION_KEY not in batch
        out.append((batch["key"], batch["image"], source.position()))
    return out


def assert_same_batches(resumed, expected):
    assert [keys for keys, _, _ in resumed] == [keys for keys, _, _ in expected]
    for (_, a, pa), (_, b, pb) in zip(resumed, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert pa == pb


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("options", [
    {},  # shuffle buffer, one pass
    {"shuffle_buffer": 0},  # no buffer: resumes by skipping whole shards
    {"epoch_size": 19},  # shards repeat until each worker has its share
    {"shuffle_buffer": 0, "epoch_size": 19, "random_flip": True, "center_crop": False},  # random augmentation
], ids=["buffer", "no-buffer", "epoch-size", "no-buffer-epoch-size-augment"])
def test_resumed_stream_is_the_tail_of_the_full_one(tmp_path, images, num_workers, options):
    urls = write_shards(tmp_path, images)
    full = run(make_source(urls, **options), num_workers)
    assert len(full) >= 6
    keys = [k for batch_keys, _, _ in full for k in batch_keys]
    assert "s2_1" not in keys  # the corrupt sample is dropped
    if "epoch_size" not in options:
        assert len(keys) == len(set(keys))
    for k in range(1, len(full) + 1):
        source = make_source(urls, **options)
        source.resume_from(full[k - 1][2])
        assert source.position() == full[k - 1][2]
        assert_same_batches(run(source, num_workers), full[k:])


def test_partial_last_batches(tmp_path, images):
    """Without drop_last each worker's last, short batch is part of the stream too."""
    urls = write_shards(tmp_path, images)
    full = run(make_source(urls), 2, batch_size=3, drop_last=False)
    assert any(len(keys) < 3 for keys, _, _ in full)
    for k in range(1, len(full) + 1):
        source = make_source(urls)
        source.resume_from(full[k - 1][2])
        assert_same_batches(run(source, 2, batch_size=3, drop_last=False), full[k:])


def test_later_epochs_after_a_resume_start_from_their_beginning(tmp_path, images):
    urls = write_shards(tmp_path, images)
    reference = make_source(urls)
    epoch0 = run(reference, 2)
    reference.set_epoch(1)
    epoch1 = run(reference, 2)
    assert [k for k, _, _ in epoch1] != [k for k, _, _ in epoch0]

    source = make_source(urls)
    source.resume_from(epoch0[2][2])
    assert_same_batches(run(source, 2), epoch0[3:])
    source.set_epoch(1)
    assert_same_batches(run(source, 2), epoch1)


def test_stream_depends_only_on_seed_epoch_rank_and_worker(tmp_path, images):
    """Iterating again (a new DataLoader, or persistent workers) gives the same epoch; set_epoch reaches
    persistent workers."""
    urls = write_shards(tmp_path, images)
    source = make_source(urls)
    first, again = run(source, 2), run(source, 2)
    assert [k for k, _, _ in first] == [k for k, _, _ in again]
    fresh = make_source(urls)
    fresh.set_epoch(1)
    epoch1 = [k for k, _, _ in run(fresh, 2)]

    persistent = make_source(urls)
    loader = DataLoader(persistent, batch_size=2, num_workers=2, drop_last=True, persistent_workers=True,
                        collate_fn=collate_image_caption)
    assert [b["key"] for b in loader] == [k for k, _, _ in first]
    persistent.set_epoch(1)
    assert [b["key"] for b in loader] == epoch1


def test_position_after_batches_without_saved_positions(tmp_path, images):
    """The fallback for checkpoints without a position: exact when nothing was dropped and no worker ran dry."""
    urls = write_shards(tmp_path, images, corrupt=False)
    for num_workers in (0, 2):
        full = run(make_source(urls, epoch_size=16), num_workers)
        assert len(full) == 8
        for k in range(1, len(full)):
            source = make_source(urls, epoch_size=16)
            source.resume_from(source.position_after_batches(0, k, batch_size=2, num_workers=num_workers))
            assert [keys for keys, _, _ in run(source, num_workers)] == [keys for keys, _, _ in full[k:]]


def test_resume_checks(tmp_path, images):
    urls = write_shards(tmp_path, images)
    full = run(make_source(urls), 2)
    source = make_source(urls)
    source.resume_from(full[1][2])
    with pytest.raises(ValueError, match="2 DataLoader worker"):
        list(source)  # one stream, but the position is for two workers
    with pytest.raises(ValueError, match="epoch 0"):
        source.set_epoch(1)
        source.resume_from(full[1][2])
    with pytest.raises(ValueError, match="not a stream position"):
        source.resume_from({"epoch": 1})
    source.resume_from(None)
    assert source.position() is None and len(list(source)) == sum(SHARD_SIZES) - 1


def fake_trainer(epoch=0, ready=0, is_last_batch=False, world_size=1):
    """What ImageCaptionDataModule reads from a trainer restored from a checkpoint."""
    progress = SimpleNamespace(is_last_batch=is_last_batch, current=SimpleNamespace(ready=ready))
    return SimpleNamespace(current_epoch=epoch, global_rank=0, world_size=world_size,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def train_keys(dm, trainer, stop=None):
    """Batches of the datamodule's train loader as the trainer takes them; the datamodule's state after `stop`."""
    dm.trainer = trainer
    keys, state = [], None
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        assert POSITION_KEY not in batch
        keys.append(batch["key"])
        if len(keys) == stop:
            state = dm.state_dict()
    return keys, state


def test_datamodule_saves_and_resumes_the_stream(tmp_path, images, caplog):
    urls = write_shards(tmp_path, images)
    dm = lambda workers=2, **options: ImageCaptionDataModule(make_source(urls, **options), batch_size=2,
                                                             num_workers=workers)
    full, state = train_keys(dm(), fake_trainer(), stop=5)
    assert state["train_stream_positions"][0]["batches"] == 5

    resumed = dm()
    resumed.load_state_dict(state)
    trainer = fake_trainer(ready=5)
    assert train_keys(resumed, trainer)[0] == full[5:]
    assert train_keys(resumed, trainer)[0] == full  # a later loader of the same fit starts at the beginning

    with caplog.at_level(logging.WARNING, logger="ldm.data"):  # another number of workers: the epoch restarts
        other = dm(workers=0)
        other.load_state_dict(state)
        assert sorted(k for b in train_keys(other, fake_trainer(ready=5))[0] for k in b) == sorted(
            k for b in full for k in b)
    assert "starts again from its beginning" in caplog.text

    # the checkpoint was taken at the last batch of epoch 0: the first loader serves epoch 1 from its start
    source = make_source(urls)
    source.set_epoch(1)
    epoch1, _ = train_keys(ImageCaptionDataModule(source, batch_size=2, num_workers=2), None)
    assert train_keys(dm(), fake_trainer(ready=len(full), is_last_batch=True))[0] == epoch1

    # a checkpoint without stream positions (older code): worked out from the trainer's batch count, exact here
    # as no sample is corrupt and epoch_size gives both workers the same share
    clean = write_shards(tmp_path / "clean", images, corrupt=False)
    dm = lambda: ImageCaptionDataModule(make_source(clean, epoch_size=16), batch_size=2, num_workers=2)
    full, _ = train_keys(dm(), fake_trainer())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        assert train_keys(dm(), fake_trainer(ready=3))[0] == full[3:]
    assert "without a saved stream position" in caplog.text
