"""Issue 15, items 1, 4, 6 and 8, at the command line where a user meets them.

1. `kill -9` mid-epoch (in an epoch after the first) and `ckpt_path=last`: the same loss at every step and the same
   final weights as an uninterrupted run, on every data source.
4. Bad data: a non-UTF-8 byte in metadata.jsonl, corrupt images read by several workers, EXIF orientation.
6. Divergence: optim.lr=1e6 checkpoints no blown-up weights, EMA and the logged loss skip the skipped steps.
8. 2-process DDP (gloo, CPU): one rank killed mid-epoch, resumed: the same run; checkpoints written by rank 0 only.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.training.conftest import TINY_MODEL, assert_same_run, logged_losses

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 24  # 6 batches of 4 per epoch
MAX_STEPS = 16
EVERY = 5  # checkpoints at steps 5, 10, 15: 10 and 15 are mid-epoch, in epochs 1 and 2


# ------------------------------------------------------------------------------------------------ running the CLI

def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONHASHSEED": "0"}


def train_cmd(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    tiny = [o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "trainer.val_check_interval",
                                                       "trainer.limit_val_batches", "++data.latent_cache"))]
    return [sys.executable, "train.py", *tiny, f"paths.run_dir={run_dir}", f"paths.cache_dir={cache}",
            f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
            "module.ema_decay=0.9", "trainer.deterministic=true",
            "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints", "+callbacks.checkpoint.save_last=true",
            "+callbacks.checkpoint.save_top_k=-1", f"+callbacks.checkpoint.every_n_train_steps={EVERY}",
            "+logger.csv.flush_logs_every_n_steps=1", f"hydra.run.dir={run_dir / 'hydra'}", *extra]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_after(cmd: list[str], run_dir: Path, step: int, watch: Path | None = None) -> None:
    """Start the command and SIGKILL it (its whole process group: DataLoader workers, DDP ranks) as soon as
    `watch` (default: the run's metrics) shows the loss of `step`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(s >= step for s, _ in logged_losses(watch or run_dir)):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run must be killed mid-training:\n{err.decode()[-3000:]}"


def checkpoint_step(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"])


def kill_resume_compare(tmp_path: Path, *data: str, batches_per_epoch: int = N_IMAGES // 4) -> None:
    """Uninterrupted run vs. a run killed after step 10 and resumed with ckpt_path=last."""
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    run(train_cmd(reference, cache, *data))
    assert sorted(s for s, _ in logged_losses(reference)) == list(range(MAX_STEPS))

    killed = tmp_path / "killed"
    cmd = train_cmd(killed, cache, *data)
    kill_after(cmd, killed, 2 * EVERY)
    resumed_at = checkpoint_step(killed)
    assert resumed_at in (2 * EVERY, 3 * EVERY)
    assert resumed_at >= batches_per_epoch and resumed_at % batches_per_epoch, "a mid-epoch resume after epoch 0"
    run(cmd + ["ckpt_path=last"])
    assert_same_run(reference, killed)


# ------------------------------------------------------------------------------------------------ data on disk

def picture(i: int, size=(20, 18)) -> Image.Image:
    """A distinct small image per index with a dark block at the top left (so orientation matters)."""
    image = Image.new("RGB", size, ((37 * i) % 256, (91 * i + 40) % 256, (200 - 13 * i) % 256))
    image.paste((0, 0, 0), (0, 0, size[0] // 3, size[1] // 3))
    return image


def write_folder(root: Path, n: int = N_IMAGES) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        picture(i).save(root / f"img{i:03d}.png")
        rows.append(json.dumps({"file_name": f"img{i:03d}.png", "text": f"picture number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def write_hf_saved(folder: Path, n: int = N_IMAGES) -> Path:
    datasets = pytest.importorskip("datasets")
    buffers = []
    for i in range(n):
        buf = io.BytesIO()
        picture(i).save(buf, format="PNG")
        buffers.append({"bytes": buf.getvalue(), "path": None})
    table = datasets.Dataset.from_dict({"image": buffers, "text": [f"picture number {i}" for i in range(n)]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(folder))
    return folder


def write_shards(folder: Path, n: int = N_IMAGES, shards: int = 4) -> str:
    wds = pytest.importorskip("webdataset")
    folder.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard-{s}.tar")) as sink:
            for i in range(s, n, shards):
                buf = io.BytesIO()
                picture(i).save(buf, format="PNG")
                sink.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": f"picture number {i}"})
    return str(folder / f"shard-{{0..{shards - 1}}}.tar")


FOLDER = ["data.train.resolution=16", "data.batch_size=4", "data.val_fraction=0"]


# ------------------------------------------------------------------------------------------------ item 1

def test_kill9_resume_shapes_cached_latents(tmp_path):
    """The default data: shapes encoded once into the latent cache, posterior draws seeded by (seed, epoch,
    index). Before the fix a resumed epoch drew epoch 0's latents (step 10 differed)."""
    kill_resume_compare(tmp_path, f"data.train.size={N_IMAGES}", "data.val.resolution=16")
    assert list((tmp_path / "cache" / "latents").glob("ShapesDataset-*/manifest.json")), "trained from the cache"


def test_kill9_resume_image_folder_two_workers(tmp_path):
    """data=folder with its default 2 DataLoader workers (the sampler's epoch must reach the workers)."""
    root = write_folder(tmp_path / "images")
    kill_resume_compare(tmp_path, "data=folder", f"data.train.root={root}", *FOLDER)


@pytest.mark.slow
def test_kill9_resume_image_folder_latent_cache(tmp_path):
    """A folder encoded with `python -m ldm.cli.latent_cache`, trained with data=latent_cache (2 workers)."""
    root = write_folder(tmp_path / "images")
    cache = tmp_path / "folder-latents"
    run([sys.executable, "-m", "ldm.cli.latent_cache", str(cache), "--source", "folder", "--path", str(root),
         "--resolution", "16", "--vae-preset", "tiny", "--batch-size", "8", "--shard-size", "10", "--device", "cpu",
         "--no-progress"])
    kill_resume_compare(tmp_path, "data=latent_cache", f"data.train.path={cache}", "data.batch_size=4",
                        "data.val_fraction=0")


@pytest.mark.slow
def test_kill9_resume_hf_saved_dataset(tmp_path):
    """data=hf on a `datasets` dataset saved to disk (2 workers)."""
    saved = write_hf_saved(tmp_path / "hf")
    kill_resume_compare(tmp_path, "data=hf", f"data.train.path={saved}", *FOLDER)


@pytest.mark.slow
def test_kill9_resume_webdataset(tmp_path):
    """data=webdataset, 4 shards, 2 workers, a shuffle buffer."""
    urls = write_shards(tmp_path / "shards")
    kill_resume_compare(tmp_path, "data=webdataset", f"data.train.urls='{urls}'", "data.train.resolution=16",
                        "data.batch_size=4", "data.train.shuffle_buffer=5")
