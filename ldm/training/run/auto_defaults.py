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

``data.train.resolution=auto`` (data=folder / hf / webdataset, ``choose_resolution``): the side a run trains at,
chosen before anything else reads the data:

- With one of our runs as ``model.pretrained``: the resolution it was trained at.
- With another pretrained model or an adapter: ``PRETRAINED_SIDE`` (256, data=folder's side before ``auto``; the
  experiments for SD 1.x / SDXL set their own 512 / 1024).
- From scratch (the small default model, a first stage trained on the images when the shipped one does not fit):
  the median short side of up to ``SAMPLE`` of the images (read from their headers, nothing decoded), rounded down
  to what the model downsamples by, at least ``MIN_SIDE``, at most ``CPU_CAP`` on a CPU (``GPU_CAP`` on a GPU). A
  run from scratch on 2 CPU cores costs ~4x per doubling of the side (first stage and U-Net): at 32 px the plain
  command learns ten-class folders in ~8 CPU-minutes (bench/plain_folder.py), at 256 px its first stage alone
  was estimated at ~410 minutes on a folder of 64-128 px photos: a user who typed the plain command waited hours.
  A stream whose images cannot be sized (webdataset) takes the cap.

The choice is said in the run's "chosen for your data" block with the setting that changes it.
"""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path
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


def stored_model_config(cfg: DictConfig) -> dict:
    """The model config stored in ``model.pretrained`` when that is one of our training checkpoints (the base of
    a LoRA / ControlNet / textual-inversion run, a run fine-tuned further): {"model": ..., "resolution": ...};
    else {}."""
    path = OmegaConf.select(cfg, "model.pretrained")
    if not path or not Path(str(path)).expanduser().is_file():
        return {}
    file = Path(str(path)).expanduser().resolve()
    stat = file.stat()
    return _stored_model_config(file, stat.st_mtime_ns, stat.st_size)  # start-up asks 4 times: one read


@functools.lru_cache(maxsize=4)
def _stored_model_config(file: Path, mtime_ns: int, size: int) -> dict:
    """The model config of the training checkpoint ``file`` as it is at (``mtime_ns``, ``size``), else {}."""
    from ldm.formats.safe_load import CheckpointError
    from ldm.formats.training_checkpoint import read_checkpoint

    try:
        stored = read_checkpoint(file)["ldm"]
    except (CheckpointError, FileNotFoundError):
        return {}  # an SD single file, an export: its own loader checks it when the model is built
    model = stored.get("model") if isinstance(stored, dict) else None
    return model if isinstance(model, dict) else {}


def stored_model_node(cfg: DictConfig, part: str) -> dict | None:
    """``model.<part>`` as stored in ``model.pretrained`` when that is one of our training checkpoints, else None."""
    node = (stored_model_config(cfg).get("model") or {}).get(part)
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


# ----------------------------------------------------------------------------------------------- resolution

SAMPLE, MIN_SIDE, CPU_CAP, GPU_CAP, PRETRAINED_SIDE = 64, 32, 64, 256, 256


def image_sides(cfg: DictConfig, n: int = SAMPLE) -> list[int]:
    """Short sides of up to ``n`` training images spread over the source, from their headers; [] when the source
    cannot size its images without reading them (a stream)."""
    from hydra.utils import instantiate

    node = OmegaConf.to_container(cfg.data.train, resolve=True)
    node["resolution"] = MIN_SIDE  # any side: only the file list and the headers are read
    dataset = instantiate(node)
    size_of: Callable | None = getattr(dataset, "image_size", None)
    try:
        total = len(dataset)
    except TypeError:
        return []
    if size_of is None or total == 0:
        return []
    step = max(1, total // n)
    sizes = (size_of(i) for i in range(0, total, step))
    return [min(size) for size in sizes if size][:n]


def downsampling(cfg: DictConfig) -> int:
    """What the model downsamples by (its VAE x its U-Net); 8 when this check does not know the networks."""
    from ldm.training.run.config_checks import autoencoder_downsampling, unet_downsampling

    model = OmegaConf.to_container(cfg.model, resolve=False)
    unet, ae = unet_downsampling(model.get("unet") or {}), autoencoder_downsampling(model.get("autoencoder") or {})
    return unet * ae if unet and ae else 8


def cuda_run(cfg: DictConfig) -> bool:
    import torch

    return OmegaConf.select(cfg, "trainer.accelerator", default="cpu") in ("gpu", "cuda", "auto") and \
        torch.cuda.is_available()


def choose_resolution(cfg: DictConfig, sides: Callable[[DictConfig], list[int]] = image_sides,
                      cuda: Callable[[DictConfig], bool] = cuda_run) -> str | None:
    """``data.train.resolution=auto`` -> a side in pixels (and ``data.val.resolution`` when it follows it); returns
    the line that says what was chosen and why (None: nothing was auto). ``sides`` / ``cuda``: tests stand in."""
    if OmegaConf.select(cfg, "data.train.resolution", default=None) != AUTO:
        return None
    stored = stored_model_config(cfg).get("resolution")
    if isinstance(stored, int) and not isinstance(stored, bool) and MIN_SIDE // 4 <= stored <= 8192:
        side, why = stored, "the resolution model.pretrained, a run of ours, was trained at"
    elif not from_scratch(cfg):
        side, why = PRETRAINED_SIDE, "a pretrained model or an adapter"
    else:
        multiple, cap = downsampling(cfg), (GPU_CAP if cuda(cfg) else CPU_CAP)
        found = sides(cfg)
        median = int(statistics.median(found)) if found else None
        target = min(cap, median) if median else cap
        side = max(MIN_SIDE, multiple, target // multiple * multiple)
        seen = f"median short side {median} px of {len(found)} images" if median else "image sizes not known"
        why = f"{seen}, at most {cap} px from scratch on {'a GPU' if cap == GPU_CAP else 'a CPU'}"
    with open_dict(cfg):
        OmegaConf.update(cfg, "data.train.resolution", side, force_add=True)
        if OmegaConf.select(cfg, "data.val.resolution", default=None) == AUTO:
            OmegaConf.update(cfg, "data.val.resolution", side)
    return f"resolution: {side} px ({why}; data.train.resolution=N sets it: ~4x the time per doubling)"


def choose_bucket_step(cfg: DictConfig) -> str | None:
    """``data.train.buckets.step=auto`` -> resolution / 8 px, at most 64 (kohya's step at SD's 512 px), rounded down
    to the model's downsampling and at least that: at 64 px on the shapes model 16 px (a 64 px step there leaves one
    square bucket: buckets that do nothing). Returns the line that says it when buckets are on (None otherwise)."""
    step = OmegaConf.select(cfg, "data.train.buckets.step", default=None)
    resolution = OmegaConf.select(cfg, "data.train.resolution", default=None)
    if step != AUTO or not isinstance(resolution, int):
        return None
    from ldm.training.run.config_checks import autoencoder_downsampling, unet_downsampling

    model = OmegaConf.to_container(cfg.model, resolve=False)
    unet, ae = unet_downsampling(model.get("unet") or {}), autoencoder_downsampling(model.get("autoencoder") or {})
    if unet and ae:
        multiple = unet * ae
        chosen = max(multiple, min(64, resolution // 8) // multiple * multiple)
    else:  # networks this does not know: SD's 64 as before auto, or the resolution (a multiple of the model's) below
        multiple, chosen = "unknown", min(64, resolution)
    with open_dict(cfg):
        OmegaConf.update(cfg, "data.train.buckets.step", chosen)
    if not OmegaConf.select(cfg, "data.train.buckets.enabled", default=False):
        return None
    return (f"buckets: step {chosen} px (resolution {resolution} / 8, at most 64, a multiple of the model's "
            f"{multiple}; data.train.buckets.step=N sets it)")

