"""Multirun: every combination in its own folder; the Optuna search config runs and reports its best trial."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers.training import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *args):
    env_cache = f"paths.cache_dir={tmp_path / 'cache'}"
    cmd = [sys.executable, "train.py", "-m", *TINY_MODEL, env_cache, "trainer.max_steps=2",
           "trainer.val_check_interval=2", "data.val.resolution=16", "data.val.size=8",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_two_point_multirun_each_in_its_own_folder(tmp_path):
    proc = _run(tmp_path, "optim.lr=1e-4,3e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    lrs = set()
    for run in runs:
        assert (run / "metrics.csv").exists()
        lrs.add(OmegaConf.load(run / "config.yaml").optim.lr)
    assert lrs == {1e-4, 3e-4}


def test_optuna_search_config_runs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _run(tmp_path, "hparams_search=shapes_optuna", "hydra.sweeper.n_trials=2",
                "hydra.sweeper.sampler.n_startup_trials=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in results and "optim.lr" in results
