import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ldm.training.run.config import register_configs

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")

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
