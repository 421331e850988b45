"""``auto`` values: batch size, accumulation, steps and the sampling cadence chosen from the dataset's size and
the machine.

``trainer.accumulate_grad_batches=auto`` and ``trainer.max_steps=auto`` (what ``data=folder`` / ``hf`` /
``webdataset`` set, data/fit/auto.yaml), ``data.batch_size=auto`` and ``callbacks.sampling.every_n_steps=auto``
(``experiment=own_data``) are replaced before anything is built, so checkpoints, resumes and the saved config.yaml
hold the plain numbers. Any of them given as a number stays as given. The rules (rules of thumb, from the shapes,
glyph and bench/plain_folder.py runs on 2 CPU cores; see README "Training your data"):

- batch size: 64 for small latents (side <= 16: the 32 px / 64 px models that train on a CPU) and 8 for larger
  ones on a GPU (4 on a CPU), never more than a tenth of the dataset (at least 10 steps per epoch), at least 4;
- accumulation: where the loader's batches are set smaller than that (data=folder's 8), as many of them per
  optimizer step as make it up (8 x 8 = 64 for 32 px on a CPU: the glyph runs' updates; 3,675 separate updates of
  8 left the prompts half learnt: 72% of icons, 34% of swatches recognised, bench/plain_folder.py);
- steps: 30 epochs of optimizer steps (of batch x accumulation images), at least 1,000 (a 2,000-image folder at
  batch 64: 1,000 steps) and at most 20,000; 1,200 when the size is unknown (a stream);
- sampling cadence: a grid every quarter of the run (rounded up to 50 steps), plus the one at the end.

The same data configs' other auto values, the first stage and the text encoder, are chosen from the data too
(``first_stage.choose_first_stage``: the VAE check; ``caption_vocab.choose_text_encoder``) for a run from scratch
(``from_scratch``); train() says all the choices in one block at its start (``stages.DiffusionStage``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

AUTO = "auto"
KEYS = ("data.batch_size", "trainer.accumulate_grad_batches", "trainer.max_steps",
        "callbacks.sampling.every_n_steps")
EPOCHS, MIN_STEPS, MAX_STEPS, UNKNOWN_SIZE_STEPS = 30, 1000, 20000, 1200


def batch_size(n_train: int | None, latent_side: int | None, cuda: bool) -> int:
    large = latent_side is not None and latent_side > 16
    batch = (8 if cuda else 4) if large else 64
    if n_train:
        batch = min(batch, max(4, n_train // 10))
    return batch


def accumulation(n_train: int | None, wanted_batch: int, batch: int) -> int:
    """Batches of ``batch`` accumulated per optimizer step to come near the batch the rules above want (a loader
    whose batches are set smaller, for memory: data=folder's 8 on a CPU -> 8 of them, 64 per update); none for a
    stream of unknown size (the tenth-of-the-data cap cannot be known)."""
    return max(1, wanted_batch // max(1, batch)) if n_train else 1


def max_steps(n_train: int | None, batch: int) -> int:
    if not n_train:
        return UNKNOWN_SIZE_STEPS
    return int(min(MAX_STEPS, max(MIN_STEPS, math.ceil(EPOCHS * n_train / batch))))


def sampling_every(steps: int) -> int:
    return int(50 * math.ceil(steps / 4 / 50))


def from_scratch(cfg: DictConfig) -> bool:
    """No pretrained weights to keep: neither ``model.pretrained`` nor an adapter on a base (data/fit/auto.yaml's
    first stage and text encoder choices apply only then)."""
    return not OmegaConf.select(cfg, "model.pretrained") and not OmegaConf.select(cfg, "adapter")


def stored_model_node(cfg: DictConfig, part: str) -> dict | None:
    """``model.<part>`` as stored in ``model.pretrained`` when that is one of our training checkpoints (the base of
    a LoRA / textual-inversion run, a run fine-tuned further), else None."""
    from pathlib import Path

    from ldm.formats.safe_load import CheckpointError
    from ldm.formats.training_checkpoint import read_checkpoint

    path = OmegaConf.select(cfg, "model.pretrained")
    if not path or not Path(str(path)).expanduser().is_file():
        return None
    try:
        stored = read_checkpoint(Path(str(path)).expanduser())["ldm"]
    except (CheckpointError, FileNotFoundError):
        return None  # an SD single file, an export: its own loader checks it when the model is built
    node = ((stored.get("model") or {}).get("model") or {}).get(part) if isinstance(stored, dict) else None
    return node if isinstance(node, dict) else None


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


def resolve_auto(cfg: DictConfig, say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Replace every ``auto`` in ``KEYS`` with its chosen value; returns {key: value} of what was chosen, and says
    it (one line) to ``say`` (train() collects it into its block of choices)."""
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
        accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1) or 1
        if accumulate == AUTO:
            accumulate = chosen["trainer.accumulate_grad_batches"] = accumulation(
                n_train, batch_size(n_train, side, cuda), int(bs))
            OmegaConf.update(cfg, "trainer.accumulate_grad_batches", accumulate)
        steps = OmegaConf.select(cfg, "trainer.max_steps")
        if steps == AUTO:  # optimizer steps, of batch x accumulation images
            steps = chosen["trainer.max_steps"] = max_steps(n_train, int(bs) * int(accumulate))
            OmegaConf.update(cfg, "trainer.max_steps", steps)
        if OmegaConf.select(cfg, "callbacks.sampling.every_n_steps", throw_on_missing=False) == AUTO:
            chosen["callbacks.sampling.every_n_steps"] = sampling_every(int(steps) if int(steps) > 0 else 1200)
            OmegaConf.update(cfg, "callbacks.sampling.every_n_steps", chosen["callbacks.sampling.every_n_steps"])
    say("auto defaults for " + (f"{n_train} training items" if n_train else "a stream of unknown size") + ": "
        + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return chosen
