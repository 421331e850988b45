"""``auto`` values: batch size, steps and the sampling cadence chosen from the dataset's size and the machine.

``data.batch_size=auto``, ``trainer.max_steps=auto`` and ``callbacks.sampling.every_n_steps=auto`` (what
``experiment=own_data`` sets) are replaced before anything is built, so checkpoints, resumes and the saved
config.yaml hold the plain numbers. Any of them given as a number stays as given. The rules (rules of thumb, from
the shapes and glyph runs on 2 CPU cores; see README "Training your data"):

- batch size: 64 for small latents (side <= 16: the 32 px / 64 px models that train on a CPU) and 8 for larger
  ones on a GPU (4 on a CPU), never more than a tenth of the dataset (at least 10 steps per epoch), at least 4;
- steps: 30 epochs, at least 1,000 (a 2,000-image folder at batch 64: 1,000 steps) and at most 20,000; 1,200 when
  the size is unknown (a stream);
- sampling cadence: a grid every quarter of the run (rounded up to 50 steps), plus the one at the end.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

AUTO = "auto"
KEYS = ("data.batch_size", "trainer.max_steps", "callbacks.sampling.every_n_steps")
EPOCHS, MIN_STEPS, MAX_STEPS, UNKNOWN_SIZE_STEPS = 30, 1000, 20000, 1200


def batch_size(n_train: int | None, latent_side: int | None, cuda: bool) -> int:
    large = latent_side is not None and latent_side > 16
    batch = (8 if cuda else 4) if large else 64
    if n_train:
        batch = min(batch, max(4, n_train // 10))
    return batch


def max_steps(n_train: int | None, batch: int) -> int:
    if not n_train:
        return UNKNOWN_SIZE_STEPS
    return int(min(MAX_STEPS, max(MIN_STEPS, math.ceil(EPOCHS * n_train / batch))))


def sampling_every(steps: int) -> int:
    return int(50 * math.ceil(steps / 4 / 50))


def auto_keys(cfg: DictConfig) -> list[str]:
    return [k for k in KEYS if OmegaConf.select(cfg, k, throw_on_missing=False) == AUTO]


def count_training_items(cfg: DictConfig) -> int | None:
    """How many training items ``data.train`` holds (None for a stream without a length)."""
    from hydra.utils import instantiate

    dataset = instantiate(cfg.data.train)
    try:
        return len(dataset)
    except TypeError:
        return None


def resolve_auto(cfg: DictConfig) -> dict[str, Any]:
    """Replace every ``auto`` in ``KEYS`` with its chosen value; returns {key: value} of what was chosen."""
    keys = auto_keys(cfg)
    if not keys:
        return {}
    import torch

    n_train = count_training_items(cfg)
    val_fraction = float(OmegaConf.select(cfg, "data.val_fraction", default=0.0) or 0.0)
    if n_train and OmegaConf.select(cfg, "data.val") is None:
        n_train -= max(1, round(n_train * val_fraction)) if val_fraction > 0 else 0
    resolution = OmegaConf.select(cfg, "data.train.resolution", default=None)
    factor = 4 if OmegaConf.select(cfg, "model.autoencoder.preset", default=None) == "shapes" else 8
    side = int(resolution) // factor if resolution else None
    cuda = OmegaConf.select(cfg, "trainer.accelerator", default="cpu") in ("gpu", "cuda", "auto") and \
        torch.cuda.is_available()
    chosen: dict[str, Any] = {}
    with open_dict(cfg):
        bs = OmegaConf.select(cfg, "data.batch_size")
        if bs == AUTO:
            bs = chosen["data.batch_size"] = batch_size(n_train, side, cuda)
            OmegaConf.update(cfg, "data.batch_size", bs)
        steps = OmegaConf.select(cfg, "trainer.max_steps")
        if steps == AUTO:
            steps = chosen["trainer.max_steps"] = max_steps(n_train, int(bs))
            OmegaConf.update(cfg, "trainer.max_steps", steps)
        if OmegaConf.select(cfg, "callbacks.sampling.every_n_steps", throw_on_missing=False) == AUTO:
            chosen["callbacks.sampling.every_n_steps"] = sampling_every(int(steps) if int(steps) > 0 else 1200)
            OmegaConf.update(cfg, "callbacks.sampling.every_n_steps", chosen["callbacks.sampling.every_n_steps"])
    print("auto defaults for " + (f"{n_train} training items" if n_train else "a stream of unknown size") + ": "
          + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return chosen
