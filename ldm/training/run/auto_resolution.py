"""``data.train.resolution=auto`` (what data=folder / hf / webdataset set): the side a run trains at, chosen from
the images and the machine before anything else reads the data.

- With a pretrained model or an adapter: ``PRETRAINED_SIDE`` (256, data=folder's side before ``auto``; the
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

import statistics
from typing import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.training.run.auto_defaults import AUTO, from_scratch

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
    if not from_scratch(cfg):
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
