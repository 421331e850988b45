"""Exact resume with webdataset shards: a run stopped at the end of an epoch and again mid-epoch (after one
DataLoader worker ran dry and a corrupt sample was dropped), each time resumed with ckpt_path=last, logs the same
loss at every step and ends with the same weights as an uninterrupted run."""

import io
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from ldm.training.run.train import train
from tests.helpers.training import TINY_MODEL, assert_same_run, compose_train, logged_losses

MAX_STEPS = 12


def write_shards(folder: Path) -> str:
    """Three shards of 7, 5 and 6 samples, one of them corrupt. With 2 workers, batches of 4 and seed 0, the epochs
    have 3, 3, 4, ... batches: worker 0 reads two shards, worker 1 one, so worker 1 runs dry early."""
    folder.mkdir(parents=True)
    for s, n in enumerate((7, 5, 6)):
        with wds.TarWriter(str(folder / f"shard-{s}.tar")) as sink:
            for i in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (20, 20), (40 * s, 30 * i, 200 - 20 * i)).save(buf, format="PNG")
                png = b"corrupt" if (s, i) == (1, 2) else buf.getvalue()
                sink.write({"__key__": f"{s}_{i}", "png": png, "txt": f"colour {s} {i}"})
    return str(folder / "shard-{0..2}.tar")


def config(root: Path, urls: str, *extra: str):
    overrides = [o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "trainer.val_check_interval",
                                                            "trainer.limit_val_batches"))]
    return compose_train(root, [
        *overrides, "data=webdataset", f"data.train.urls='{urls}'", "data.train.resolution=16",
        "data.num_workers=2", "data.train.shuffle_buffer=5", "trainer.limit_val_batches=0",
        "trainer.deterministic=true", "module.ema_decay=0.9", f"trainer.max_steps={MAX_STEPS}",
        "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints", "+callbacks.checkpoint.save_last=true",
        "+callbacks.checkpoint.every_n_train_steps=1", "+logger.csv.flush_logs_every_n_steps=1", *extra])


def stream_position(root: Path) -> tuple[int, int, int, int]:
    ckpt = torch.load(root / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    (position,) = ckpt["ImageCaptionDataModule"]["train_stream_positions"]
    return position["epoch"], position["batches"], position["next_role"], position["workers"]


def test_stop_at_epoch_end_and_mid_epoch_then_resume(tmp_path):
    urls = write_shards(tmp_path / "shards")
    reference = train(config(tmp_path / "reference", urls))
    assert reference["global_step"] == MAX_STEPS
    ref_dir = Path(reference["run_dir"])

    stopped = tmp_path / "stopped"
    assert train(config(stopped, urls, "trainer.max_steps=3"))["global_step"] == 3  # the end of epoch 0
    assert stream_position(stopped) == (0, 3, 1, 2)  # (epoch, batches done in it, next role, workers)
    assert train(config(stopped, urls, "trainer.max_steps=9", "ckpt_path=last"))["global_step"] == 9
    # 3 of epoch 2's 4 batches done, from workers 0, 1, 0; worker 1 has no more: the last one is worker 0's
    assert stream_position(stopped) == (2, 3, 1, 2)
    resumed = train(config(stopped, urls, "ckpt_path=last"))
    assert resumed["global_step"] == MAX_STEPS

    assert sorted(s for s, _ in logged_losses(ref_dir)) == list(range(MAX_STEPS))
    assert_same_run(ref_dir, Path(resumed["run_dir"]))
