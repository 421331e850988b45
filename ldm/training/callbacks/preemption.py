"""Runs that survive preemption. A signal (SIGTERM from a scheduler or ``timeout``, SIGINT from Ctrl+C, SLURM's
SIGUSR1 ahead of its kill with ``--signal=USR1@90``) lets the step being trained finish, writes
``checkpoints/last.ckpt`` at that step and stops the run with exit status 128 + the signal's number (143 for SIGTERM,
130 for SIGINT, 138 for SIGUSR1), as a shell reports a process the signal killed: a scheduler sees a run that did not
finish, and ``ckpt_path=last`` continues it exactly. A second signal abandons the run at once (a checkpoint being
written is dropped with its partial file; the previous last.ckpt stays); after it the signals act as usual again.

Lightning 2.x's own handling is replaced, for the signals configured, while the training loop runs: it stops on
SIGTERM after the step with exit status 0 and no checkpoint, decides on rank 0's flag alone (broadcast from inside
its signal handler and again every step), leaves SIGINT to a KeyboardInterrupt raised wherever the loop is (exit 1,
nothing saved), and under SLURM's auto-requeue saves an hpc_ckpt from inside the SIGUSR1 handler, at whatever point
of a step it arrives. Here the handler only records the signal; the checkpoint is taken at a step boundary that every
rank agrees on, at the point where ModelCheckpoint saves, so resuming from it is exact."""

from __future__ import annotations

import logging
import os
import shlex
import signal
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ldm.training.callbacks.result import ResultCallback

log = logging.getLogger("ldm.training")

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class SignalExit(SystemExit):
    """The run stopped on a signal: exit status 128 + its number. A SystemExit, so that nothing on the way out
    (``except Exception`` blocks, Hydra's error report) takes it for an error and changes the status."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.result: dict[str, Any] = {}  # train()'s result for the stopped run, filled on the way out


def signal_numbers(names: Iterable[str]) -> list[signal.Signals]:
    """The ``signals`` setting: names such as SIGTERM (or TERM) to signals; ValueError names a bad one."""
    out = []
    for name in names:
        full = str(name).upper() if str(name).upper().startswith("SIG") else f"SIG{str(name).upper()}"
        if full not in signal.Signals.__members__:
            raise ValueError(f"signals: {name!r} is not a signal on this system (e.g. SIGTERM, SIGINT, SIGUSR1)")
        if full in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"signals: {full} cannot be caught, so no checkpoint can be written on it")
        out.append(signal.Signals[full])
    return list(dict.fromkeys(out))


def _say(text: str) -> None:
    """Write from a signal handler: a direct write, never the buffered stderr the interrupted code may be using."""
    os.write(2, text.encode())


def agreement_group() -> Any:
    """The process group the per-step flag is all-reduced in under DDP (None on one process): a gloo group, so the
    flag is a CPU tensor and checking it costs no device sync."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def agreed_signal(local: int, group: Any) -> int:
    """The signal every rank acts on: the largest number any rank received (0: none), so all ranks stop at the same
    step even when the signal reached only one of them (``timeout`` or ``kill`` signal rank 0 alone)."""
    if group is None:
        return local
    flag = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


class PreemptionCallback(ResultCallback):
    """On the first configured signal: finish the step, save ``<dirpath>/last.ckpt`` (all ranks take part; rank 0
    writes, through the trainer's atomic checkpoint IO), stop with SignalExit. On a second one: SignalExit at once."""

    def __init__(self, dirpath: str | Path, signals: Iterable[str] = DEFAULT_SIGNALS):
        self.dirpath = Path(dirpath)
        self.signals = signal_numbers(signals)
        self.received: list[int] = []  # signals this process got while its handler was set, in order
        self.stop: dict[str, Any] | None = None  # set once the run stops on a signal: what it left behind
        self._previous: dict[int, Any] = {}  # the handlers this callback replaced
        self._pid: int | None = None
        self._active = False
        self._step_seen = -1
        self._group: Any = None

    # ------------------------------------------------------------------------------------------------ handlers
    def _install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            log.warning("the trainer runs outside the main thread: signals are not handled by ldm")
            return
        self._pid, self._active = os.getpid(), True
        for signum in self.signals:
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        """The handlers that were set before this callback's. Lightning's teardown may set this one again (it
        restores what it found when fit began): from now on it acts as the handler it replaced."""
        self._active = False
        for signum in self.signals:
            signal.signal(signum, self._usual(signum))

    def _usual(self, signum: int) -> Any:
        previous = self._previous.get(signum)
        return signal.SIG_DFL if previous is None or previous == self._on_signal else previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked while the handler was set: the training process decides
        if not self._active:
            return _act_as(self._usual(signum), signum, frame)
        self.received.append(signum)
        name = signal.Signals(signum).name
        if len(self.received) == 1:
            _say(f"\nreceived {name}: finishing this step, then saving a checkpoint and stopping "
                 f"(send it again to stop at once without one)\n")
            return
        self.restore()  # a third signal has its usual effect
        _say(f"\nreceived {name} again: stopping now\n")
        self.stop = self.stop or {"signal": name, "step": None, "checkpoint": None}
        raise SignalExit(signum)  # inside a save: AtomicCheckpointIO removes the partial file, last.ckpt stays

    # --------------------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        self._install()  # before the DataLoader workers fork: they inherit it, and leave SIGINT/SIGUSR1 to us

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()  # again: Lightning has just wrapped SIGTERM in its own handler
        self._step_seen = trainer.global_step
        self._group = agreement_group()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stop is not None or trainer.global_step == self._step_seen:
            return  # stopping already, or no optimizer step in this batch yet (gradient accumulation)
        self._step_seen = trainer.global_step
        signum = agreed_signal(self.received[0] if self.received else 0, self._group)
        if signum:
            self._save(trainer, signal.Signals(signum).name)

    def _save(self, trainer, name: str) -> None:
        """last.ckpt at this step, where ModelCheckpoint saves (its own files due at this step follow)."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        path = self.dirpath / "last.ckpt"
        log.warning("%s: saving %s at step %d, then stopping", name, path, trainer.global_step)
        for cb in trainer.checkpoint_callbacks:  # its state in the file, and train()'s result, name this file
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath \
                    and Path(cb.dirpath).resolve() == path.parent.resolve():
                cb.last_model_path = str(path)
        before = _mtime(path)
        trainer.save_checkpoint(path, weights_only=False)
        written = _mtime(path) != before  # an unchanged file: the checkpoint gate refused diverged weights
        self.stop = {"signal": name, "step": trainer.global_step, "checkpoint": str(path) if written else None}

    def _stop_if_saved(self) -> None:
        """Stop at the first hook after the step's checkpoint where stopping is clean: its metrics are logged."""
        if self.stop is not None:
            raise SignalExit(signal.Signals[self.stop["signal"]])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop_if_saved()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop_if_saved()  # no validation run (nor the metrics computed after it) for a stopping run

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_if_saved()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_if_saved()
        self.restore()  # the end-of-run work (final samples, files) is not a step: signals act as usual there
        if self.received:
            log.warning("received %s after the last step: the run finished", signal.Signals(self.received[0]).name)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.restore()  # after Lightning's teardown, which sets back the handlers it found: this one among them

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.restore()
        launcher = trainer.strategy.launcher
        if isinstance(exception, SignalExit) and self.stop and self.stop["step"] is None and launcher is not None:
            launcher.kill(signal.SIGKILL)  # abandoned on rank 0: the ranks it launched would wait for it forever

    def result(self) -> dict[str, Any]:
        if self.stop is None:
            return {}
        out: dict[str, Any] = {"stopped": dict(self.stop)}
        if self.stop["checkpoint"]:
            out["last_checkpoint"] = self.stop["checkpoint"]
        return out


def _act_as(handler: Any, signum: int, frame: Any) -> None:
    """What a signal does under ``handler``: call it, ignore the signal, or its default action (usually death by
    it, the exit status a scheduler expects)."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def resume_command(run_dir: str | Path) -> str:
    """The command that continues a stopped run: this process's overrides (Hydra's), its run folder, and
    ckpt_path=last once that folder has a last.ckpt (before one, the run starts again there)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    tail = [f"paths.run_dir={run_dir}"] + (["ckpt_path=last"] if _last(run_dir).exists() else [])
    if not HydraConfig.initialized():  # train(cfg) called from Python: its overrides are the caller's
        return "python train.py <the same overrides> " + shlex.join(tail)
    own = {"ckpt_path", "paths.run_dir"}
    given = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)  # as typed: ${...} kept
    keep = [o for o in given if o.lstrip("+~").split("=")[0] not in own]
    return shlex.join(["python", "train.py", *keep, *tail])


def _last(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def stop_summary(stop: dict[str, Any], run_dir: str | Path) -> list[str]:
    """The end-of-run lines of a run stopped by a signal: what was saved, and ``stop["resume"]``, the command that
    continues it (train() sets it: a first stage's is its whole run's, ``stop["first_stage"]`` marks one)."""
    status = 128 + signal.Signals[stop["signal"]]
    if stop["checkpoint"]:
        lines = [f"  PREEMPTED by {stop['signal']} at step {stop['step']}: checkpoint {stop['checkpoint']} "
                 f"(exit status {status})"]
    else:
        kept = f"{_last(run_dir)} holds an earlier step" if _last(run_dir).exists() else "no checkpoint was written"
        lines = [f"  STOPPED by {stop['signal']} before a checkpoint of this step was written: {kept} "
                 f"(exit status {status})"]
    if stop.get("resume"):
        lines.append(f"  {'resume' if 'ckpt_path=last' in stop['resume'] else 'start again'} with: {stop['resume']}")
    if stop.get("first_stage"):
        lines.append("  (this was the run's first stage: it trains again from its start, its checkpoint unused)")
    return lines
