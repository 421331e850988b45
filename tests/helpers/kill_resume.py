"""kill -9 a training run mid-epoch and resume it with ckpt_path=last: the commands, the kill and the comparison
with an uninterrupted run (tests/reliability/test_resume_and_data.py, the optimizers' resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import ROOT
from tests.helpers.training import TINY_MODEL, assert_same_run, logged_losses

N_IMAGES = 24  # 6 batches of 4 per epoch
MAX_STEPS = 16
EVERY = 5  # checkpoints at steps 5, 10, 15: 10 and 15 are mid-epoch, in epochs 1 and 2


# ------------------------------------------------------------------------------------------------ running the CLI

def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONHASHSEED": "0"}


def train_cmd(run_dir: Path, cache: Path, *extra: str, max_steps: int = MAX_STEPS, every: int = EVERY) -> list[str]:
    tiny = [o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "trainer.val_check_interval",
                                                       "trainer.limit_val_batches", "++data.latent_cache",
                                                       "data.train.resolution"))]
    return [sys.executable, "train.py", *tiny, f"paths.run_dir={run_dir}", f"paths.cache_dir={cache}",
            f"trainer.max_steps={max_steps}", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
            "module.ema_decay=0.9", "trainer.deterministic=true",
            "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints", "+callbacks.checkpoint.save_last=true",
            "+callbacks.checkpoint.save_top_k=-1", f"+callbacks.checkpoint.every_n_train_steps={every}",
            "+logger.csv.flush_logs_every_n_steps=1", f"hydra.run.dir={run_dir / 'hydra'}", *extra]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_train(cmd: list[str], run_dir: Path) -> None:
    """run(cmd), keeping its output in the run folder (to read when a comparison fails)."""
    proc = run(cmd)
    with open(run_dir / "output.txt", "a") as f:
        f.write(proc.stdout + proc.stderr)


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
    run_train(train_cmd(reference, cache, *data), reference)
    assert sorted(s for s, _ in logged_losses(reference)) == list(range(MAX_STEPS))

    killed = tmp_path / "killed"
    cmd = train_cmd(killed, cache, *data)
    kill_after(cmd, killed, 2 * EVERY)
    resumed_at = checkpoint_step(killed)
    assert resumed_at in (2 * EVERY, 3 * EVERY)
    assert resumed_at >= batches_per_epoch and resumed_at % batches_per_epoch, "a mid-epoch resume after epoch 0"
    run_train(cmd + ["ckpt_path=last"], killed)
    assert_same_run(reference, killed)
