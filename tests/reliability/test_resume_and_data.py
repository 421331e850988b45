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

from ldm.training.run.resume import AtomicCheckpointIO
from tests.helpers.kill_resume import (EVERY, N_IMAGES, ROOT, checkpoint_step, env, kill_resume_compare, run,
                                       run_train, train_cmd)
from tests.helpers.training import assert_same_run, logged_losses, tiny_cfg  # noqa: F401 (fixture)


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
    kill_resume_compare(tmp_path, f"data.train.size={N_IMAGES}", "data.train.resolution=16", "data.val.resolution=16")
    assert list((tmp_path / "cache" / "latents").rglob("manifest.json")), "trained from the cache"


def test_kill9_resume_image_folder_two_workers(tmp_path):
    """data=folder encoded on the fly by its default 2 DataLoader workers (the sampler's epoch must reach the
    workers)."""
    root = write_folder(tmp_path / "images")
    kill_resume_compare(tmp_path, "data=folder", f"data.train.root={root}", *FOLDER, "data.latent_cache=null")


def test_kill9_resume_image_folder_automatic_cache(tmp_path):
    """data=folder as configured: encoded once into the automatic latent cache, posteriors drawn per epoch."""
    root = write_folder(tmp_path / "images")
    kill_resume_compare(tmp_path, "data=folder", f"data.train.root={root}", *FOLDER)
    assert list((tmp_path / "cache" / "latents").rglob("manifest.json")), "trained from the cache"


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


# ------------------------------------------------------------------------------------------------ item 6

def test_lr_1e6_checkpoints_no_blown_up_weights_and_logs_no_stale_loss(tmp_path):
    """optim.lr=1e6: step 0's update blows the weights up (max |w| ~1e4 before the fix, and that was saved as
    step=1.ckpt); the NaN steps after it logged step 0's loss again. Now: no checkpoint of those weights, no
    loss logged for a skipped step, a clear stop after 5 skipped steps in a row."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(run_dir, tmp_path / "cache", f"data.train.size={N_IMAGES}", "data.train.resolution=16",
                    "data.val.resolution=16", "optim.lr=1e6", every=1)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "5 steps in a row were skipped" in proc.stderr and "optim.lr" in proc.stderr
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt") if (run_dir / "checkpoints").exists() else []:
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        biggest = max(float(v.abs().max()) for k, v in state.items() if k.startswith(("unet.", "ema.")) and
                      v.is_floating_point())
        assert biggest < 100, f"{ckpt.name} holds blown-up weights (max |w| {biggest:.3g})"
    import csv

    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    skipped = [r for r in rows if r.get("train/nonfinite_steps") or r.get("train/diverged_steps")]
    assert len(skipped) >= 3
    assert all(not r["train/loss"] and not r["train/grad_norm"] for r in skipped), skipped
    assert [r["step"] for r in rows if r["train/loss"]] == ["0"]  # only the applied step has a loss


def _poisoned_fit(tiny_cfg, poison: dict[int, float], max_steps: int, *overrides: str):
    """Fit in-process with the loss of some steps multiplied (by NaN, inf or a large factor: the gradients scale
    with it); records the U-Net and EMA weights after every batch."""
    import lightning as L
    from hydra.utils import instantiate

    from ldm.training.run.train import build_diffusion_module

    cfg = tiny_cfg("trainer.limit_val_batches=0", "module.ema_decay=0.9", *overrides)
    module = build_diffusion_module(cfg)
    step_loss, calls = module.step_loss, {"n": 0}

    def poisoned(batch):
        loss = step_loss(batch)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return loss * poison[step] if step in poison else loss

    module.step_loss = poisoned
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append(({k: v.clone() for k, v in pl_module.unet.state_dict().items()},
                              {k: v.clone() for k, v in pl_module.ema.model.state_dict().items()}))

    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Snapshot()])
    trainer.fit(module, datamodule=instantiate(cfg.data))
    return module, snapshots


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_skipped_steps_leave_weights_and_ema_alone(tiny_cfg):
    module, snaps = _poisoned_fit(tiny_cfg, {2: float("nan"), 3: float("inf")}, max_steps=5)
    assert module.guard.nonfinite_total == 2 and int(module.ema.num_updates) == 3
    for step in (2, 3):  # skipped: neither the weights nor their average moved
        assert _same(snaps[step][0], snaps[1][0]) and _same(snaps[step][1], snaps[1][1])
    assert not _same(snaps[4][0], snaps[1][0]) and not _same(snaps[4][1], snaps[1][1])  # step 4 trained


@pytest.mark.parametrize("overrides, skipped", [
    ((), True),  # the loss spike (and the gradient-norm spike) skip the step
    (("module.loss_spike_factor=null",), True),  # the gradient-norm spike alone
    (("module.loss_spike_factor=null", "module.grad_norm_spike_factor=null"), False),  # guard off
])
def test_divergence_guard_skips_a_loss_spike(tiny_cfg, overrides, skipped):
    """The loss x 1e4 at step 3: a finite loss and gradient norm orders of magnitude above their level."""
    module, snaps = _poisoned_fit(tiny_cfg, {3: 1e4}, 5, *overrides)
    assert module.guard.diverged_total == int(skipped)
    assert _same(snaps[3][0], snaps[2][0]) == skipped
    assert int(module.ema.num_updates) == 5 - int(skipped)


def test_divergence_guard_levels():
    from ldm.training.module.divergence import DivergenceGuard

    guard = DivergenceGuard(loss_factor=10, grad_norm_factor=None, momentum=0.5)
    assert guard.verdict(1e9) is None  # no level yet: only NaN/inf are refused
    assert guard.verdict(float("nan")).startswith("non-finite")
    guard.accept(2.0, 5.0)
    guard.accept(4.0, 5e6)
    level = (0.5 * 0.5 * 2.0 + 0.5 * 4.0) / (1 - 0.5 ** 2)  # bias-corrected EMA: (0.5 x 1 + 2) / 0.75
    assert guard.levels["loss"].value(0.5) == pytest.approx(level)
    assert guard.verdict(10 * level * 0.99) is None and "running level" in guard.verdict(10 * level * 1.01)
    assert guard.verdict(1.0, 1e30) is None  # grad-norm check off
    restored = DivergenceGuard(loss_factor=10, grad_norm_factor=None, momentum=0.5)
    restored.load_state_dict(guard.state_dict())
    assert restored.levels["loss"].value(0.5) == pytest.approx(level)
    with pytest.raises(ValueError, match="loss_factor"):
        DivergenceGuard(loss_factor=0.5)


# ------------------------------------------------------------------------------------------------ item 4

def test_non_utf8_metadata_row_is_named_and_skipped(tmp_path):
    """One non-UTF-8 byte in metadata.jsonl used to abort with ~7 KB of the file in the message."""
    root = write_folder(tmp_path / "images", n=8)
    lines = (root / "metadata.jsonl").read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b"number", b"num\xe9ro")  # latin-1 e-acute: not UTF-8
    (root / "metadata.jsonl").write_bytes(b"".join(lines) + b'{"file_name": "img000.png", "text": "' +
                                          b"x" * 7000 + b'"}\n')
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, tmp_path / "cache", "data=folder", f"data.train.root={root}", *FOLDER,
                         max_steps=2))
    output = proc.stdout + proc.stderr
    message = [line for line in output.splitlines() if "not UTF-8" in line]
    assert len(message) == 1 and f"{root / 'metadata.jsonl'}:5:" in message[0] and "0xe9" in message[0]
    assert "x" * 100 not in output and "num" not in message[0]  # names the place, never dumps the content

    from ldm.data.image_folder import ImageFolderDataset

    ds = ImageFolderDataset(root, resolution=16)
    assert ds.bad_metadata_rows == 1 and ds.missing_captions == 1 and ds.captions[4] == ""
    assert ds.captions[3] == "picture number 3"


def _exif_rotated_jpeg(path: Path) -> Image.Image:
    """The picture stored rotated by 90 degrees with EXIF orientation 6 ("rotate 270 to display"): a viewer
    shows the upright picture. Returns the upright picture."""
    upright_image = picture(1, size=(24, 16))
    stored = upright_image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return upright_image


@pytest.mark.parametrize("source", ["folder", "hf", "webdataset"])
def test_exif_orientation_is_applied(tmp_path, source):
    import numpy as np

    from ldm.data.transforms import ImageTransform

    root = tmp_path / "images"
    root.mkdir()
    upright_image = _exif_rotated_jpeg(root / "photo.jpg")
    if source == "folder":
        from ldm.data.image_folder import ImageFolderDataset

        item = ImageFolderDataset(root, resolution=16)[0]
    elif source == "hf":
        datasets = pytest.importorskip("datasets")
        from ldm.data.hf_dataset import HFDataset

        table = datasets.Dataset.from_dict({"image": [str(root / "photo.jpg")], "text": ["a photo"]})
        table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
        item = HFDataset(str(tmp_path / "hf"), resolution=16)[0]
    else:
        wds = pytest.importorskip("webdataset")
        from ldm.data.webdataset import WebDatasetSource

        with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
            sink.write({"__key__": "photo", "jpg": (root / "photo.jpg").read_bytes(), "txt": "a photo"})
        item = next(iter(WebDatasetSource(str(tmp_path / "shard.tar"), resolution=16, shuffle_buffer=0)))
    expected = ImageTransform(16)(upright_image)
    assert item["image"].shape == expected.shape
    assert float((item["image"] - expected).abs().mean()) < 0.05  # JPEG noise only; unrotated differs by ~0.5
    assert np.asarray(Image.open(root / "photo.jpg")).shape[:2] == (24, 16)  # stored sideways indeed


def test_bad_images_named_once_across_workers_and_counted(tmp_path):
    """Two corrupt files, data=folder with 2 workers, 3 epochs: before, each was warned by every worker of
    every epoch and never counted. Now each is named once, counted in data/bad_samples and in the summary."""
    root = write_folder(tmp_path / "images", n=12)
    (root / "img003.png").write_bytes(b"not a png")
    (root / "img007.png").write_bytes((root / "img008.png").read_bytes()[:60])  # truncated
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, tmp_path / "cache", "data=folder", f"data.train.root={root}", *FOLDER,
                         "data.latent_cache=null", max_steps=9))  # 3 batches of 4 per epoch: 3 epochs
    output = proc.stdout + proc.stderr
    for name in ("img003.png", "img007.png"):
        assert sum(f"unreadable sample {name}" in line for line in output.splitlines()) == 1, output[-3000:]
    assert "unreadable samples skipped: 2" in proc.stdout
    import csv

    with open(run_dir / "metrics.csv") as f:
        counts = [float(r["data/bad_samples"]) for r in csv.DictReader(f) if r.get("data/bad_samples")]
    assert counts and counts[-1] == 2.0


# ------------------------------------------------------------------------------------------------ item 8

DDP = ["trainer.devices=2", "+trainer.strategy=ddp", f"data.train.size={N_IMAGES}", "data.train.resolution=16",
       "data.val.resolution=16"]  # 24 samples, batches of 4 per rank: 3 steps per epoch


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_ddp_rank_killed_mid_epoch_then_resumed(tmp_path):
    """2 processes (gloo, CPU): rank 1 is SIGKILLed mid-epoch; rank 0 must not hang, and no checkpoint is
    half-written; `ckpt_path=last` on 2 processes then gives the losses and weights of an uninterrupted run."""
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    run_train(train_cmd(reference, cache, *DDP, max_steps=12), reference)
    assert sorted(s for s, _ in logged_losses(reference)) == list(range(12))

    killed = tmp_path / "killed"
    cmd = train_cmd(killed, cache, *DDP, max_steps=12)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline, victim = time.time() + 600, None
    while time.time() < deadline and proc.poll() is None:
        if any(s >= EVERY + 1 for s, _ in logged_losses(killed)):
            (victim,) = _children(proc.pid)  # Lightning starts rank 1 as a child of rank 0
            os.kill(victim, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert victim is not None, "rank 1 must be killed mid-training"
    try:  # rank 0 notices its peer is gone at the next collective and stops
        _, err = proc.communicate(timeout=180)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        hung = True
    assert not hung, "rank 0 hung after rank 1 died"
    assert proc.returncode != 0
    files = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert not [f for f in files if f.endswith(".tmp")], files  # no half-written file left
    for name in files:
        torch.load(killed / "checkpoints" / name, weights_only=True)  # every one complete
    resumed_at = checkpoint_step(killed)
    assert resumed_at in (EVERY, 2 * EVERY) and resumed_at % 3, "a mid-epoch resume"
    run_train(cmd + ["ckpt_path=last"], killed)
    assert_same_run(reference, killed)


class RecordingIO(AtomicCheckpointIO):
    """AtomicCheckpointIO that also leaves a note naming the rank of every process that writes a file."""

    def __init__(self, notes: str):
        super().__init__()
        self.notes = notes

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else -1
        Path(self.notes, f"rank{rank}-{Path(path).name}-{time.monotonic_ns()}").touch()
        super().save_checkpoint(checkpoint, path, storage_options)


@pytest.mark.slow
def test_ddp_checkpoints_are_written_by_rank_0_only(tiny_cfg, tmp_path):
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ldm.training.run.train import build_diffusion_module

    cfg = tiny_cfg("data.train.size=32", "data.batch_size=4", "trainer.limit_val_batches=0")
    notes = tmp_path / "notes"
    notes.mkdir()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False, plugins=[RecordingIO(str(notes))],
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True,
                                                   save_top_k=-1)])
    trainer.fit(build_diffusion_module(cfg), datamodule=instantiate(cfg.data))
    writers = {p.name.split("-")[0] for p in notes.iterdir()}
    assert writers == {"rank0"}, writers
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "last.ckpt" in files and not [f for f in files if f.endswith(".tmp")]
    for name in files:
        assert torch.load(tmp_path / "ckpt" / name, weights_only=True)["global_step"] >= 1


def test_latent_cache_posterior_draws_reach_persistent_workers(tmp_path):
    """persistent_workers keep their copy of the dataset: set_epoch must still change their posterior draws."""
    from torch.utils.data import DataLoader

    from ldm.data.cached_latents import CachedLatentsDataset

    cache = tmp_path / "cache"
    run([sys.executable, "-m", "ldm.cli.latent_cache", str(cache), "--source", "shapes", "--size", "4",
         "--resolution", "16", "--vae-preset", "tiny", "--device", "cpu", "--no-progress"])
    ds = CachedLatentsDataset(cache)
    loader = DataLoader(ds, batch_size=4, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append(next(iter(loader))["latents"])
    ds.set_epoch(1)
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(epochs[1], torch.stack([ds[i]["latents"] for i in range(4)]))
