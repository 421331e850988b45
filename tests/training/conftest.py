from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ldm.training.config import register_configs

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
