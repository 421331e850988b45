"""Preemption-safe runs: a signal sent to `python train.py` mid-run finishes the step, writes last.ckpt at it and exits
with 128 + the signal's number; `ckpt_path=last` then continues exactly (the losses of every step equal an
uninterrupted run's). A second signal stops at once, leaving the previous last.ckpt loadable and no partial file."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.training.callbacks.preemption import PreemptionCallback, SignalExit, signal_numbers
from ldm.training.run.config_checks import ConfigError
from tests.helpers import ROOT
from tests.helpers.training import assert_same_run, logged_losses
from tests.helpers.training import child_env as _env, reference, resume_cmd as _cmd  # noqa: F401 - a fixture

FEW = "+callbacks.checkpoint.every_n_train_steps=1000"  # no checkpoint due before the signal (but at epoch ends)


def start(cmd: list[str], out: Path) -> subprocess.Popen:
    """The run in a process group of its own (with its DataLoader workers), as a terminal or SLURM task has."""
    log = open(out, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    """Until metrics.csv holds the loss of `step` (the run is training) or the run ends."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").exists() and any(s >= step for s, _ in logged_losses(run)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before step {step} (exit status {proc.poll()})")


def stopped_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def test_sigterm_mid_run_checkpoints_the_step_reached_and_resumes_exactly(reference, tmp_path):
    run = tmp_path / "preempted"
    cmd = _cmd(run, reference.parent / "cache", FEW)
    proc = start(cmd, tmp_path / "out.txt")
    wait_for_step(proc, run, 1)  # epoch 0 has 6 steps: the first checkpoint ModelCheckpoint would write is at 6
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    ckpt = stopped_checkpoint(run)
    steps = [s for s, _ in logged_losses(run)]
    assert ckpt["global_step"] == max(steps) + 1 < 6, "last.ckpt is at the step reached, its loss logged"
    out = (tmp_path / "out.txt").read_text()
    assert "PREEMPTED by SIGTERM" in out and f"paths.run_dir={run} ckpt_path=last" in out

    from ldm.formats.load import load_bundle  # what sample.py and ldm.evaluate load

    assert load_bundle(run / "checkpoints" / "last.ckpt").unet is not None
    subprocess.run([*cmd, "ckpt_path=last"], cwd=ROOT, env=_env(), check=True, capture_output=True)
    assert_same_run(reference, run)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_slurms_sigusr1_exit_128_plus_the_signal(reference, tmp_path, signum):
    """Sent to the whole process group, as Ctrl+C in a terminal and SLURM's --signal do: the DataLoader workers get
    it too and leave it to the training process (they would die on it otherwise, and the run with them)."""
    run = tmp_path / "stopped"
    proc = start(_cmd(run, reference.parent / "cache", FEW, "data.num_workers=2"), tmp_path / "out.txt")
    wait_for_step(proc, run, 2)
    os.killpg(proc.pid, signum)
    assert proc.wait(timeout=120) == 128 + signum  # 130, 138
    assert stopped_checkpoint(run)["global_step"] == max(s for s, _ in logged_losses(run)) + 1


RUNNER = """
import os, runpy, sys, time
from pathlib import Path
import torch
slow, saving = Path(sys.argv[1]), Path(sys.argv[2])
real_save = torch.save
def save(obj, f, *args, **kwargs):  # once `slow` exists: a save that takes two minutes, the signal comes during it
    if slow.exists() and not saving.exists():
        f.write(b"partial")
        f.flush()
        saving.touch()
        time.sleep(120)
    real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = ["train.py", *sys.argv[3:]]
sys.path.insert(0, os.getcwd())
runpy.run_path(os.path.join(os.getcwd(), "train.py"), run_name="__main__")
"""


def test_second_sigint_during_the_save_stops_at_once_and_keeps_the_previous_checkpoint(reference, tmp_path):
    run, slow, saving = tmp_path / "twice", tmp_path / "slow", tmp_path / "saving"
    (tmp_path / "runner.py").write_text(RUNNER)
    cmd = _cmd(run, reference.parent / "cache", "+callbacks.checkpoint.every_n_train_steps=1")
    proc = start([sys.executable, str(tmp_path / "runner.py"), str(slow), str(saving), *cmd[2:]],
                 tmp_path / "out.txt")
    wait_for_step(proc, run, 2)
    slow.touch()
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while not saving.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert saving.exists(), "the save after the first signal began"
    time.sleep(0.2)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130 and time.time() - sent < 20, "stopped at once, not after the save"
    folder = run / "checkpoints"
    assert not list(folder.glob(".*.tmp")), "the partial file is removed"
    from ldm.training.run.resume import AtomicCheckpointIO

    assert AtomicCheckpointIO().load_checkpoint(folder / "last.ckpt")["global_step"] >= 2  # the previous one
    assert "STOPPED by SIGINT" in (tmp_path / "out.txt").read_text()
    subprocess.run([*cmd, "ckpt_path=last"], cwd=ROOT, env=_env(), check=True, capture_output=True)
    assert_same_run(reference, run)


def test_ddp_ranks_agree_when_only_rank_0_gets_the_signal(reference, tmp_path):
    """`timeout` and `kill` signal the launching process (rank 0) alone: rank 1 learns it at the step boundary, both
    take part in the save at the same step and stop; no process is left behind."""
    run = tmp_path / "ddp"
    cmd = _cmd(run, reference.parent / "cache", FEW, "+trainer.strategy=ddp", "trainer.devices=2",
               "data.train.size=48")
    proc = start(cmd, tmp_path / "out.txt")
    wait_for_step(proc, run, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    step = stopped_checkpoint(run)["global_step"]
    out = (tmp_path / "out.txt").read_text()
    assert out.count(f"SIGTERM: saving {run / 'checkpoints' / 'last.ckpt'} at step {step}, then stopping") == 2
    assert "received SIGTERM" in out


# ---- the pieces, in this process

def test_signal_names():
    assert signal_numbers(["SIGTERM", "int", "USR1", "SIGTERM"]) == [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
    with pytest.raises(ValueError, match="SIGFOO"):
        signal_numbers(["SIGFOO"])
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        signal_numbers(["KILL"])


def test_a_bad_signal_name_is_a_config_error(tiny_cfg):
    from ldm.training.run.train import validate

    with pytest.raises(ConfigError, match="signals: 'SIGFOO'"):
        validate(tiny_cfg("signals=[SIGTERM,SIGFOO]"))


def test_first_signal_is_recorded_second_stops_then_the_usual_handler_is_back(tmp_path):
    seen = []
    usual = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        cb = PreemptionCallback(tmp_path, ["SIGUSR1"])
        cb._install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert cb.received == [signal.SIGUSR1] and not seen  # recorded: the step finishes first
        with pytest.raises(SignalExit) as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.value.code == 128 + signal.SIGUSR1 and cb.result()["stopped"]["checkpoint"] is None
        os.kill(os.getpid(), signal.SIGUSR1)  # after the second one: the handler that was there before
        assert seen == [signal.SIGUSR1]
        signal.signal(signal.SIGUSR1, cb._on_signal)  # set again (Lightning's teardown restores what it found)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] * 2, "an inactive handler acts as the one it replaced"
    finally:
        signal.signal(signal.SIGUSR1, usual)


def test_the_summary_says_how_to_continue(tmp_path):
    from ldm.training.callbacks.preemption import resume_command, stop_summary

    run = tmp_path / "run"
    assert "ckpt_path=last" not in resume_command(run)  # no checkpoint yet: the run starts again in its folder
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").touch()
    command = resume_command(run)
    assert command.endswith(f"paths.run_dir={run} ckpt_path=last")
    stop = {"signal": "SIGTERM", "step": 40, "checkpoint": str(run / "checkpoints" / "last.ckpt"), "resume": command}
    lines = stop_summary(stop, run)
    assert "PREEMPTED by SIGTERM at step 40" in lines[0] and "exit status 143" in lines[0]
    assert lines[1] == f"  resume with: {command}"
    abandoned = stop_summary({**stop, "signal": "SIGINT", "step": None, "checkpoint": None}, run)
    assert "holds an earlier step" in abandoned[0] and "exit status 130" in abandoned[0]
    nested = stop_summary({**stop, "first_stage": True}, run)
    assert "first stage" in nested[-1]
