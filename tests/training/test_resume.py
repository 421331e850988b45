"""Exact resume: a run killed with SIGKILL at an arbitrary step (or stopped cleanly mid-epoch) and resumed from
its last checkpoint logs the same loss at every step and ends with the same weights as an uninterrupted run."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.training import assert_same_run, child_env, logged_losses, reference, resume_cmd  # noqa: F401


def test_sigkill_at_a_random_step_then_resume(reference, tmp_path):
    kill_after = random.Random().randint(3, 7)
    run = tmp_path / "killed"
    cmd = resume_cmd(run, reference.parent / "cache", "+callbacks.checkpoint.every_n_train_steps=2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").exists() and any(s >= kill_after for s, _ in logged_losses(run)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-training"
    assert (run / "checkpoints" / "last.ckpt").exists()
    subprocess.run(cmd + ["ckpt_path=last"], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    assert_same_run(reference, run)


def test_clean_stop_mid_epoch_then_resume(reference, tmp_path):
    run = tmp_path / "stopped"
    cmd = resume_cmd(run, reference.parent / "cache", "+callbacks.checkpoint.every_n_train_steps=1")
    subprocess.run([*cmd, "trainer.max_steps=4"], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    subprocess.run([*cmd, "ckpt_path=last"], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    assert_same_run(reference, run)


def test_atomic_save_interrupted_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A save killed half-way (here: torch.save dies after writing part of the file) leaves last.ckpt intact."""
    from ldm.training.run.resume import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "step": 1}, path)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"\x00" * 100)  # a partial write, then the process is "killed"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = io.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.ones(1000))


def test_sigkill_during_a_real_save_keeps_previous_checkpoint(tmp_path):
    """The same with a real SIGKILL while a large checkpoint is being written by another process."""
    from ldm.training.run.resume import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(10)}, path)
    code = (f"import torch; from ldm.training.run.resume import AtomicCheckpointIO\\n"
            f"AtomicCheckpointIO().save_checkpoint({{'step': 2, 'w': torch.zeros(400_000_000 // 4)}}, r'{path}')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=child_env())
    tmp = path.with_name(f".{path.name}.tmp")
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp.exists() and tmp.stat().st_size > 1_000_000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1
