"""`python train.py trainer=fsdp2` on 2 CPU ranks (gloo): FSDP2 through Lightning's ModelParallelStrategy
(ldm.training.build.strategies.ShardedDataParallel; the module shards itself in configure_model,
ldm/training/module/sharded/fsdp2.py), full fine-tuning with its EMA and adapter=lora.

Checked against `+trainer.strategy=ddp` on the same 2 ranks: each rank draws the same noise, timesteps and samples
under both strategies, so DDP (replicated weights, all-reduced gradients) is the data-parallel reference run;
FSDP2's reduce-scatter sums the gradients in another order, so the weights agree to 1e-5 (fp32, 4 AdamW steps;
measured: 3.8e-8 U-Net, 2.7e-8 EMA, losses equal), the losses to 1e-5. A run stopped at step 2 and resumed with ckpt_path=last, from the sharded
checkpoint folder and from the full (one file) checkpoint, ends bit for bit as the uninterrupted run; the folder
exports with `python -m ldm.export` (read by ldm.formats.sharded_checkpoint)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.formats.training_checkpoint import read_checkpoint
from tests.helpers import ROOT
from tests.helpers.training import TINY_MODEL, base, child_env, logged_losses  # noqa: F401 (base: a fixture)

pytestmark = pytest.mark.slow  # 2-process train.py runs, ~10-20 s each on the shared CPUs
TIMEOUT = 300  # a run that hangs (a collective one rank never joins) fails the test instead
FSDP2 = ["trainer=fsdp2", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32"]
DDP = ["+trainer.strategy=ddp", "trainer.devices=2"]
WEIGHTS_TOL = 1e-5


def train(run: Path, *args: str, steps: int = 4) -> Path:
    overrides = [o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "trainer.val_check_interval",
                                                            "trainer.limit_val_batches"))]
    cmd = [sys.executable, "train.py", *overrides, f"paths.run_dir={run}", f"paths.cache_dir={run.parent / 'cache'}",
           f"trainer.max_steps={steps}", "data.train.size=16", "data.val.resolution=16",  # 2 steps an epoch
           "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "trainer.deterministic=true",
           "module.ema_decay=0.9", "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
           "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints", "+callbacks.checkpoint.save_last=true",
           "+callbacks.checkpoint.every_n_train_steps=1", "+logger.csv.flush_logs_every_n_steps=1",
           f"hydra.run.dir={run / 'hydra'}", *args]
    proc = bounded(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run


def bounded(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` (and the rank it starts) in its own process group, killed whole after TIMEOUT s: a hang (a
    collective one rank never joins) fails the test instead of blocking it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:3])}... hung for {TIMEOUT} s:\n{out[-2000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def trained(run: Path) -> dict[str, torch.Tensor]:
    """The trained weights of the run's last checkpoint (a sharded folder or a file)."""
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("unet.", "ema.", "lora."))}


def assert_close_runs(a: Path, b: Path, tol: float) -> float:
    wa, wb = trained(a), trained(b)
    assert wa.keys() == wb.keys() and wa
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= tol, f"max |difference| {worst:.3e}"
    la, lb = dict(logged_losses(a)), dict(logged_losses(b))
    assert la.keys() == lb.keys() == set(range(4))
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=tol, rel=tol), step
    return worst


def stopped_and_resumed(run: Path, *args: str) -> Path:
    train(run, *args, steps=2)
    return train(run, *args, "ckpt_path=last")


def test_fsdp2_full_finetune_matches_ddp_resumes_and_exports(tmp_path):
    ddp = train(tmp_path / "ddp", *DDP)
    sharded = train(tmp_path / "fsdp2", *FSDP2)
    last = sharded / "checkpoints" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(last.parent.glob(".*")), "no partial (.tmp) or moved-aside (.old) folder left"
    assert_close_runs(sharded, ddp, WEIGHTS_TOL)
    assert any(k.startswith("ema.") for k in trained(sharded)), "the EMA is sharded and saved too"

    resumed = stopped_and_resumed(tmp_path / "resumed", *FSDP2)
    assert assert_close_runs(resumed, sharded, 0.0) == 0.0  # bit for bit, EMA included

    full = FSDP2 + ["trainer.strategy.save_distributed_checkpoint=false"]
    full_resumed = stopped_and_resumed(tmp_path / "full_resumed", *full)
    assert (full_resumed / "checkpoints" / "last.ckpt").is_file()
    assert assert_close_runs(full_resumed, sharded, 0.0) == 0.0

    out = tmp_path / "exported"
    proc = bounded([sys.executable, "-m", "ldm.export", str(last), "--format", "ldm", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    from ldm.formats.load import load_bundle

    unet = load_bundle(str(out)).unet.state_dict()
    ema = {k[len("ema.model."):]: v for k, v in trained(sharded).items() if k.startswith("ema.model.")}
    assert ema.keys() == unet.keys()
    assert all(torch.equal(unet[k], ema[k]) for k in ema), "the export holds the EMA weights of the sharded run"


def test_fsdp2_lora_matches_ddp_resumes_and_samples(tmp_path, base):
    """adapter=lora, with a sample grid every 2 steps (under FSDP2 every rank samples in lockstep: the sharded
    U-Net's forward is a collective; rank 0 writes the grid)."""
    lora = [base, "adapter=lora", "adapter.preset=full", "adapter.rank=2", "optim.lr=1e-2", "sampler.steps=2",
            "+callbacks.sampling._target_=ldm.training.callbacks.sampling.SamplingCallback",
            "+callbacks.sampling.every_n_steps=2", "+callbacks.sampling.n_prompts=2"]
    ddp = train(tmp_path / "ddp", *DDP, *lora)
    sharded = train(tmp_path / "fsdp2", *FSDP2, *lora)
    weights = trained(sharded)
    assert weights and all(k.startswith(("lora.", "ema.")) for k in weights), "an adapter run saves the adapter"
    assert_close_runs(sharded, ddp, WEIGHTS_TOL)
    assert sorted(p.name for p in (sharded / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    resumed = stopped_and_resumed(tmp_path / "resumed", *FSDP2, *lora)
    assert assert_close_runs(resumed, sharded, 0.0) == 0.0
    from safetensors.torch import load_file  # the adapter file rank 0 wrote from the gathered weights

    a, b = load_file(sharded / "lora.safetensors"), load_file(ddp / "lora.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=WEIGHTS_TOL, rtol=WEIGHTS_TOL, msg=key)
