"""DreamBooth's class images: before training, fill the class folder up to ``data.train.num_class_images`` with
samples of the base model for ``data.train.class_prompt`` (Ruiz et al. 2023, sec. 4.2; diffusers'
examples/dreambooth/train_dreambooth.py generates them the same way when the folder holds fewer). ``class_prompt``
may be a list: image k is sampled with prompt k mod n, a prior over several prompts (kohya's regularization images
with their own captions). Each image is written with its prompt as a ``.txt`` sidecar (before the PNG), which the
dataset reads as its caption.

Resumable and seeded: image k of the folder (counting the images already there, e.g. your own) is
``<class_root>/<k:05d>.png``, sampled in batch b = k // batch_size whose initial noise is seeded with
``class_images.seed + b``; each PNG is written to a temporary name and renamed, one by one. A run killed while
generating continues at the existing count, regenerates the batch it was in and writes only its missing images,
so the folder ends up byte-identical to an uninterrupted run's. Only rank 0 generates (on the device the run trains
on); other ranks wait.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ldm.training")

WAIT_SECONDS = 4 * 3600  # how long other DDP ranks wait for rank 0's images


@dataclass
class ClassImagesConfig:
    """``class_images:`` in train.yaml: how the missing class images are sampled (the sampler is ``sampler``)."""

    guidance_scale: float = 3.0
    batch_size: int = 16
    seed: int = 0
    use_ema: bool = False  # the base model's weights as loaded (a fresh module's EMA equals them anyway)


def class_image_path(root: Path, k: int) -> Path:
    return root / f"{k:05d}.png"


def ensure_class_images(cfg: DictConfig, module, *, rank: int = 0, progress: bool = True) -> int:
    """Generate the missing class images of a DreamBooth config (``data.train.class_root`` set); returns how many
    were written (0: the folder was full, or the data has no class folder)."""
    from ldm.data.dreambooth import count_images

    root = OmegaConf.select(cfg, "data.train.class_root")
    if root is None or OmegaConf.select(cfg, "data.train._target_") != "ldm.data.dreambooth.DreamBoothDataset":
        return 0
    from ldm.data.dreambooth import class_prompts

    prompt = OmegaConf.select(cfg, "data.train.class_prompt")
    wanted = int(OmegaConf.select(cfg, "data.train.num_class_images", default=100))
    if not prompt:
        raise ValueError("data.train.class_prompt is not set: the class images are sampled with it")
    prompts = class_prompts(prompt)
    root = Path(root).expanduser()
    existing = count_images(root)
    if existing >= wanted:
        print(f"class images: {existing} in {root} (num_class_images={wanted}), none to generate")
        return 0
    if rank != 0:
        return _wait_for(root, wanted)
    options = ClassImagesConfig(**OmegaConf.to_container(cfg.class_images or {}, resolve=True))
    if options.batch_size <= 0:
        raise ValueError(f"class_images.batch_size must be a positive integer, got {options.batch_size}")
    from ldm.pipelines.sampling_options import SamplingOptions

    sampler = SamplingOptions.of(cfg.sampler, key="sampler")
    resolution = OmegaConf.select(cfg, "data.train.resolution")
    named = repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts"
    print(f"class images: generating {wanted - existing} of {named} into {root} with the base model "
          f"({existing} there; {sampler.name} {sampler.steps} steps, guidance {options.guidance_scale})")
    from ldm.training.run.latent_prep import cache_device, on_device

    start = time.perf_counter()
    device = cache_device(OmegaConf.select(cfg, "trainer.accelerator"), OmegaConf.select(cfg, "trainer.devices"))
    with on_device([module], device):  # on the device the run trains on: a GPU run samples on its GPU
        written = generate_class_images(module, root, prompts, existing, wanted, options, sampler, resolution,
                                        progress)
    log.info("class images: %d generated in %.1f s", written, time.perf_counter() - start)
    return written


def generate_class_images(module, root: Path, prompts: list[str], existing: int, wanted: int, options: ClassImagesConfig,
                          sampler, resolution: int | None, progress: bool = True) -> int:
    """Images ``existing..wanted-1`` of the folder, batch by batch (see the module docstring)."""
    import torch

    from ldm.pipelines import text_to_image
    from ldm.pipelines.images import to_pil

    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob("*.png.tmp"), *root.glob("*.txt.tmp")]:  # a write killed half-way
        stale.unlink()
    bar = _progress(wanted, existing) if progress else None
    written, B = 0, options.batch_size
    try:
        with torch.random.fork_rng(devices=[]), module.sampling_bundle(use_ema=options.use_ema) as bundle:
            was_training = bundle.unet.training
            bundle.unet.eval()
            try:
                for b in range(existing // B, (wanted + B - 1) // B):
                    first, last = b * B, min(wanted, (b + 1) * B)
                    batch_prompts = [prompts[k % len(prompts)] for k in range(first, last)]
                    images = text_to_image(bundle, batch_prompts, sampler=sampler,
                                           guidance_scale=options.guidance_scale, seed=options.seed + b,
                                           height=resolution, width=resolution)
                    for k, image, prompt in zip(range(first, last), to_pil(images), batch_prompts):
                        if k < existing:
                            continue  # written by the run that was killed in this batch
                        path = class_image_path(root, k)
                        if path.exists():  # a file of yours with this name: keep it, count on
                            path = root / f"{k:05d}-generated.png"
                        caption = path.with_suffix(".txt")
                        tmp = caption.with_name(caption.name + ".tmp")
                        tmp.write_text(prompt + "\n", encoding="utf-8")
                        os.replace(tmp, caption)  # the caption first: a PNG here always has its prompt
                        tmp = path.with_name(path.name + ".tmp")
                        image.save(tmp, format="PNG")
                        os.replace(tmp, path)
                        written += 1
                        if bar is not None:
                            bar.update(1)
            finally:
                bundle.unet.train(was_training)
    finally:
        if bar is not None:
            bar.close()
    return written


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="class images", unit="img", dynamic_ncols=True)


def _wait_for(root: Path, wanted: int) -> int:
    from ldm.data.dreambooth import count_images

    deadline = time.monotonic() + WAIT_SECONDS
    while count_images(root) < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not generate the class images in {root} within {WAIT_SECONDS} s")
        time.sleep(2.0)
    return 0
