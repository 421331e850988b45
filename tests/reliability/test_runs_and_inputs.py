"""Issue 15: runs that never lose anything. Each test reproduces one thing a hostile-but-realistic user broke,
at the level where the user hits it (train.py / sample.py on the command line where it matters)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import TINY_MODEL, logged_losses

ROOT = Path(__file__).resolve().parents[2]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def train_cmd(outputs: Path, cache: Path, *extra: str) -> list[str]:
    """train.py on the tiny model with the default run folders (outputs/train/<paths.run_stamp>/)."""
    overrides = [o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "callbacks="))]
    return [sys.executable, "train.py", *overrides, f"paths.output_dir={outputs}", f"paths.cache_dir={cache}",
            "data.train.size=24", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
            "~callbacks.sampling", "~callbacks.prompt_accuracy", "callbacks.checkpoint.every_n_train_steps=2",
            "+logger.csv.flush_logs_every_n_steps=1", *extra]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---- item 2: run folders

def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    """paths.run_stamp without time fields: both runs ask for the very same folder name, as two runs started
    in the same second do with the default stamp."""
    outputs = tmp_path / "outputs"
    cmds = [train_cmd(outputs, tmp_path / "cache", "paths.run_stamp=same-second", f"trainer.max_steps={n}",
                      f"seed={n}") for n in (3, 4)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    runs = sorted(p.name for p in (outputs / "train").iterdir())
    assert runs == ["same-second", "same-second-1"]
    steps = sorted(len(logged_losses(outputs / "train" / r)) for r in runs)
    assert steps == [3, 4], "each folder holds one run's metrics, each step once"
    seeds = sorted((outputs / "train" / r / "config.yaml").read_text().count("seed: 3") for r in runs)
    assert seeds == [0, 1], "each folder has its own config.yaml"
    for r in runs:
        assert (outputs / "train" / r / "checkpoints" / "last.ckpt").exists()


def test_resume_leaves_no_stray_folder_and_no_versioned_duplicate(tmp_path):
    """A run 'killed' after writing step0000004.ckpt but before last.ckpt caught up (last.ckpt is step 2),
    resumed with ckpt_path=last: step 4 is written again under its own name, not as step0000004-v1.ckpt, and
    the resumed process's fresh Hydra folder is folded into the run (resume-1/), not left behind."""
    outputs, cache = tmp_path / "outputs", tmp_path / "cache"
    run_ok(train_cmd(outputs, cache, "paths.run_stamp=first", "trainer.max_steps=4"))
    ckpts = outputs / "train" / "first" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    (ckpts / "last.ckpt").write_bytes((ckpts / "step0000002.ckpt").read_bytes())
    out = run_ok(train_cmd(outputs, cache, "paths.run_stamp=second", "trainer.max_steps=6", "ckpt_path=last"))
    assert "resuming" in out.stdout
    assert sorted(p.name for p in (outputs / "train").iterdir()) == ["first"], "no folder left by the resume"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt",
                                                      "step0000006.ckpt"]
    kept = outputs / "train" / "first" / "resume-1"
    assert (kept / "hydra" / "config.yaml").exists() and (kept / "train.log").exists()
