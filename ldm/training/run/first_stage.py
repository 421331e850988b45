"""Two stages in one run: fit a VAE to the user's images, then train the diffusion model on its latents.

A config with a ``first_stage`` node (``experiment=own_data``) and no ``model.autoencoder.weights`` first trains the
autoencoder that node describes on the run's own training data, in ``<run>/first_stage/`` (a run of the
autoencoder stage like ``experiment=shapes_vae``, with its own checkpoints and metrics.csv), then freezes it for the
diffusion stage: ``model.autoencoder.weights`` is set to ``<run>/first_stage/autoencoder.safetensors`` (weights,
architecture and calibrated scaling factor, Rombach et al. 2022 sec. 4.3). A resumed or repeated run in the same
folder reuses that file instead of training it again.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("ldm.training")

SUBDIR = "first_stage"
WEIGHTS = "autoencoder.safetensors"
REQUIRED = ("autoencoder", "module", "loss", "optim", "max_steps", "batch_size")


def first_stage_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The autoencoder-stage config: the run's data, seed, trainer and loggers; the first_stage node's model,
    module, loss, optimizer, schedule, batch size and steps; its own folder ``<run>/first_stage``."""
    fs = cfg.first_stage
    missing = [k for k in REQUIRED if OmegaConf.select(fs, k) is None]
    if missing:
        raise ValueError(f"first_stage: missing {', '.join('first_stage.' + k for k in missing)}")
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        sub.stage = "autoencoder"
        sub.ckpt_path = None
        sub.task_name = f"{cfg.task_name}_{SUBDIR}"
        sub.optimized_metric = "val/rec_loss"
        sub.model = {"autoencoder": fs.autoencoder, "unet": None, "text_encoder": None, "pretrained": None}
        sub.module, sub.loss, sub.optim = fs.module, fs.loss, fs.optim
        sub.lr_scheduler = fs.get("lr_scheduler")
        sub.data.batch_size = fs.batch_size
        if "latent_cache" in sub.data:
            sub.data.latent_cache = None  # images, not latents: this stage makes the VAE
        sub.trainer.max_steps = fs.max_steps
        sub.trainer.val_check_interval = fs.max_steps
        sub.trainer.gradient_clip_val = None  # manual optimisation: AutoencoderTraining clips itself
        sub.callbacks = fs.get("callbacks") or {}
        sub.paths.run_dir = str(run_dir / SUBDIR)
    return sub


def ensure_first_stage(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig], dict]) -> Path | None:
    """Train (or reuse) the first stage when ``cfg.first_stage`` asks for it; point model.autoencoder.weights at
    the result. Returns the weights path, or None when the run needs no first stage."""
    if cfg.stage != "diffusion" or OmegaConf.select(cfg, "first_stage") is None:
        return None
    if OmegaConf.select(cfg, "model.autoencoder.weights") is not None:
        log.info("first_stage: model.autoencoder.weights is set, so no VAE is trained")
        return None
    weights = run_dir / SUBDIR / WEIGHTS
    if weights.is_file():
        print(f"first stage: reusing the VAE trained earlier in this run: {weights}")
    else:
        print(f"first stage: training a VAE on the training images ({cfg.first_stage.max_steps} steps, "
              f"into {weights.parent})")
        try:
            result = train(first_stage_config(cfg, run_dir))
        except ValueError as e:  # name the key of *this* config: the stage's model.autoencoder is first_stage's
            text = str(e)
            for key in ("model.autoencoder", "module", "loss", "optim", "lr_scheduler"):
                if text.startswith(key + ":") or text.startswith(key + " "):
                    text = "first_stage." + text.removeprefix("model.")
                    break
            raise ValueError(text) from e
        weights = Path(result["autoencoder"])
        print(f"first stage: done, latent scaling factor {result['scaling_factor']:.4f}; now the diffusion model")
    with open_dict(cfg):
        cfg.model.autoencoder.weights = str(weights)
    return weights
