"""Tiny training runs: the overrides that make a run small, configs/train.yaml composed in-process, the train.py
command line for runs in a child process, and comparing a stopped-and-resumed run with an uninterrupted one."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ldm.training.run.config import register_configs
from tests.helpers import CONFIGS, ROOT

# A model small enough to train a few steps in seconds on a CPU: tiny U-Net, fresh tiny VAE (factor 2),
# the tiny local CLIP (32-d context).
TINY_MODEL = [
    "model.unet.model_channels=64", "model.unet.channel_mult=[1,1]", "model.unet.attention_levels=[1]",
    "model.unet.num_head_channels=32",
    "model.autoencoder.preset=tiny", "model.autoencoder.weights=null",
    "data.batch_size=4", "data.train.resolution=16",
    "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
    "lr_scheduler.warmup_steps=1", "callbacks=none", "++data.latent_cache=null",
]

# Two steps on a folder of 16 px images on the CPU (fine-tuning a pretrained folder: tests/training/test_*_pretrained)
FOLDER_RUN = ["trainer=cpu", "data.batch_size=2", "data.train.resolution=16", "data.num_workers=0",
              "data.val_fraction=0.34", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=1", "trainer.accumulate_grad_batches=1", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "lr_scheduler.warmup_steps=1",
              "callbacks=none", "++data.latent_cache=null"]

# A checkpoint callback for runs composed with callbacks=none: last.ckpt in <run>/checkpoints.
CKPT = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"]

# at resolution 16, step 8 (min side 8, max 32) the table is (8,24), (8,32), (16,16), (24,8), (32,8)
BUCKETS = ["data=folder", "data.train.buckets.enabled=true", "data.train.buckets.step=8", "data.num_workers=0",
           "data.val_fraction=0.2", "data.batch_size=3"]

SDXL_TINY = ["model=sdxl_tiny", "data.batch_size=4", "data.train.resolution=16", "data.train.size=32",
             "data.val.size=8", "data.val.resolution=16", "trainer.max_steps=3", "trainer.val_check_interval=3",
             "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             "trainer.log_every_n_steps=1", "lr_scheduler.warmup_steps=1", "callbacks=none"]


# the tiny MMDiT (model=mmdit_tiny) with flow matching, a few steps
MMDIT_TINY = ["model=mmdit_tiny", "schedule=flow", "sampler=flow_euler", "module.timesteps.kind=logit_normal",
              "data.batch_size=4", "data.train.resolution=16", "data.train.size=16", "data.val.size=4",
              "data.val.resolution=16", "trainer.max_steps=3", "trainer.val_check_interval=3",
              "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
              "trainer.log_every_n_steps=1", "lr_scheduler.warmup_steps=1", "callbacks=none", "++data.latent_cache=null"]

def compose_train(tmp_path: Path, overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.run_dir={tmp_path / 'run'}",
                                                       f"paths.cache_dir={tmp_path.parent / 'ldm-cache'}",
                                                       *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str, tiny: bool = True):
        return compose_train(tmp_path, (TINY_MODEL if tiny else []) + list(overrides))

    return make


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained base (a fresh U-Net's zero-initialised output convs would pass no gradient to any adapter)."""
    from ldm.training.run.train import train

    tmp = tmp_path_factory.mktemp("base")
    result = train(compose_train(tmp, TINY_MODEL + CKPT + ["optim.lr=3e-2", "trainer.max_steps=4"]))
    return f"model.pretrained={result['last_checkpoint']}"


class RecordSeen(L.Callback):
    """Writes the sample indices each rank trained on, and its final U-Net weights."""

    def __init__(self, out: str):
        self.out, self.seen = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += batch["index"].tolist()

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        Path(self.out, f"seen{rank}.json").write_text(json.dumps(self.seen))
        torch.save(pl_module.unet.state_dict(), Path(self.out, f"unet{rank}.pt"))


# ---- train.py in a child process, stopped and resumed

MAX_STEPS = 10


def resume_cmd(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    overrides = [o for o in TINY_MODEL if not o.startswith("trainer.max_steps")]
    return [sys.executable, "train.py", *overrides, f"paths.run_dir={run_dir}", f"paths.cache_dir={cache}",
            f"trainer.max_steps={MAX_STEPS}", "data.train.size=24", "data.val.resolution=16",  # 6 batches/epoch
            "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "module.ema_decay=0.9",
            "trainer.deterministic=true",
            "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints", "+callbacks.checkpoint.save_last=true",
            "+callbacks.checkpoint.save_top_k=-1", "+logger.csv.flush_logs_every_n_steps=1",
            "hydra.run.dir=" + str(run_dir / "hydra"), *extra]


def child_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


# ---- comparing a stopped-and-resumed run with an uninterrupted one (the resume tests)

def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    """Losses of every step, from metrics.csv and the files kept from before each resume."""
    rows = []
    for path in sorted(run_dir.glob("metrics.before-resume-*.csv")) + [run_dir / "metrics.csv"]:
        if path.exists():
            with open(path) as f:
                rows += [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]
    return rows


def final_weights(run_dir: Path) -> dict:
    sd = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith(("unet.", "ema."))}


def assert_same_run(reference: Path, resumed: Path):
    ref = dict(logged_losses(reference))
    rows = logged_losses(resumed)
    assert {s for s, _ in rows} == set(ref), "every step was trained"
    for step, loss in rows:  # replayed steps (logged twice) must match as well
        assert loss == pytest.approx(ref[step], abs=1e-6, rel=1e-6), f"step {step}"
    a, b = final_weights(reference), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)


def stopped_and_resumed(tmp_path: Path, *args: str) -> tuple[Path, Path]:
    """An uninterrupted 10-step run of ``args`` and one stopped after step 4 and resumed with ckpt_path=last
    (train.py in subprocesses), checked to be the same run; returns (reference, resumed) run folders."""
    ref = tmp_path / "ref"
    subprocess.run(resume_cmd(ref, tmp_path / "cache", *args), cwd=ROOT, env=child_env(), check=True,
                   capture_output=True)
    assert [s for s, _ in logged_losses(ref)][-1] == 9
    run = tmp_path / "stopped"
    cmd = resume_cmd(run, tmp_path / "cache", *args, "+callbacks.checkpoint.every_n_train_steps=1")
    subprocess.run([*cmd, "trainer.max_steps=4"], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    subprocess.run([*cmd, "ckpt_path=last"], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    assert_same_run(ref, run)
    return ref, run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted resumable run (train.py in a subprocess) that interrupted runs are compared with."""
    run = tmp_path_factory.mktemp("reference")
    subprocess.run(resume_cmd(run, run.parent / "cache", "+callbacks.checkpoint.every_n_train_steps=2"), cwd=ROOT,
                   env=child_env(), check=True, capture_output=True)
    assert [s for s, _ in logged_losses(run)][-1] == MAX_STEPS - 1
    return run
