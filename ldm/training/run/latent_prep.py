"""The automatic latent cache of train(cfg): encode the training set once with the frozen VAE (and the frozen text
encoder), then train from the cache.

The VAE and the text encoder are frozen, so encoding every image and caption again each epoch buys nothing. With
``data.latent_cache=<root>`` (the default of data=shapes / folder / hf / webdataset) train(cfg) keeps
``<root>/<Dataset>-<16 hex>/`` in step with the training set (`ldm.data.auto_cache.sync_cache`, with a progress bar;
only new or changed images are encoded, a killed build is finished next time) and swaps the training dataset for
a view of it that draws a fresh latent per sample and epoch (seeded by seed, epoch and index: resumes stay exact).

The folder name is a hash of what the cache depends on besides the images themselves: the dataset's settings
(root, transform), the VAE's weights and scaling, the text encoder's weights (when contexts are cached) and the
store. The images are keyed one by one inside it (for a folder: path, size, mtime, caption).

Text contexts are not cached (captions are, and are encoded each step) with random caption options (shuffle, tag
dropout, wildcards: ``data.train.captions``) or long prompts (``model.text_encoder.max_chunks`` > 1).

What cannot be cached: a random crop (``center_crop=false``; each epoch sees another crop) trains on the fly, with
a warning; ``data.latent_cache=null`` trains on the fly always (for augmentations of your own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from ldm.data.auto_cache import PART_SIZE, CacheSpec, CachedView, cache_spec, contexts_cacheable, sync_cache
from ldm.data.protocols import PairedRows
from ldm.formats.shared_names import shared_config

log = logging.getLogger("ldm.training")



def weights_fingerprint(module: torch.nn.Module, *extra: object) -> str:
    """SHA-256 over a module's parameter/buffer names, shapes, dtypes and bytes, plus `extra` values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(json.dumps([str(e) for e in extra]).encode())
    return digest.hexdigest()


def spec_of(dataset: Dataset) -> CacheSpec:
    """The dataset's CacheSpec, or a ValueError that names the way out."""
    spec = cache_spec(dataset)
    if spec is None:
        raise ValueError(
            f"data.latent_cache: {type(dataset).__name__} does not say what its samples depend on (no cache_spec()), "
            "so a cache of it could silently go stale. Set data.latent_cache=null to encode on the fly."
        )
    return spec


def cache_folder(root: str | Path, spec: CacheSpec, autoencoder: torch.nn.Module, store: str,
                 text_encoder: torch.nn.Module | None = None) -> Path:
    """``<root>/<kind>-<16 hex>``: one folder per (dataset settings, VAE weights, store, text encoder weights)."""
    extra: list[Any] = [json.dumps(spec.settings, sort_keys=True, default=str), store,
                        autoencoder.scaling_factor, autoencoder.shift_factor]
    if text_encoder is not None:
        extra.append(weights_fingerprint(text_encoder))
    fingerprint = weights_fingerprint(autoencoder, *extra)
    return Path(root).expanduser() / f"{spec.settings.get('kind', 'dataset')}-{fingerprint[:16]}"


def text_encoder_is_frozen(text_encoder: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in text_encoder.parameters())


# How many images the frozen networks see at once while the cache is built (issue 28, bench/README.md "The first
# epoch"). On the CPU the VAE's convolutions are fastest on a few images at a time: at 64 px (SD-1.5's VAE, fp32,
# one thread) 1-8 images took ~85 ms each, 32-64 images ~160-300 ms each, their activations no longer fitting the
# CPU's caches; so a micro-batch there holds at most CPU_ENCODE_PIXELS pixels. On a GPU the whole loader batch.
CPU_ENCODE_PIXELS = 8 * 64 * 64
CPU_TEXT_BATCH = 8  # CLIP ViT-L/14 size on the CPU: 8 prompts ~125 ms each, 1 ~190 ms, 32 ~140 ms
CPU_ENCODE_THREADS = 8  # at most this many calls of the frozen networks at once (encode_threads)


def micro_batch(device: torch.device, pixels: int, batch: int) -> int:
    """Images per call of the first stage while caching: the whole batch on a GPU, few on the CPU."""
    if device.type != "cpu":
        return max(1, batch)
    return max(1, min(batch, CPU_ENCODE_PIXELS // max(1, pixels)))


def encode_threads(device: torch.device) -> int:
    """Threads that run the frozen networks' calls side by side while caching. On the CPU with intra-op threads
    that leave cores idle (one thread per process, as under OMP_NUM_THREADS=1 or on a big machine) each call is
    single-core work: the text encoder's and the VAE's calls then run at once, one per free core (each op's math
    is the same, so are the rows). On a GPU one thread: its kernels queue asynchronously already."""
    if device.type != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(CPU_ENCODE_THREADS, cores // max(1, torch.get_num_threads())))


def run_side_by_side(tasks: list[Callable[[], Any]], threads: int) -> list[Any]:
    """Each task's result, in order; ``threads`` > 1: run by that many threads at once (torch releases the GIL
    inside its ops), each with the caller's intra-op thread count and gradients off (both are per thread)."""
    if threads <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    intra = torch.get_num_threads()

    def run(task):
        torch.set_num_threads(intra)
        with torch.no_grad():
            return task()

    with ThreadPoolExecutor(min(threads, len(tasks)), thread_name_prefix="ldm-encode") as pool:
        return list(pool.map(run, tasks))


def caption_tasks(text_encoder: torch.nn.Module, captions: list[str], device: torch.device
                  ) -> tuple[list[Callable[[], torch.Tensor]], list[int]]:
    """The text encoder's work on a batch's captions as tasks, each distinct caption once (a random flip caches
    every image twice with one caption; DreamBooth's rows share theirs), ``CPU_TEXT_BATCH`` prompts a task on the
    CPU; and the row of the concatenated task results for each caption. CLIP's rows do not depend on their
    batch-mates, so these are the batch's contexts as one call gives them (tests/training/test_latent_prep.py checks
    it bit for bit). The tokenizer runs here, once, in the calling thread (a fast tokenizer is not to be shared
    between threads); the tasks only run the network (``encode_ids``). An encoder without that split (or memoising
    its contexts) is one task: one thread calls it."""
    unique = list(dict.fromkeys(captions))
    step = CPU_TEXT_BATCH if device.type == "cpu" else max(1, len(unique))
    row = {caption: i for i, caption in enumerate(unique)}
    rows = [row[c] for c in captions]
    chunks = [unique[s:s + step] for s in range(0, len(unique), step)]
    split = (callable(getattr(text_encoder, "tokenize", None)) and callable(getattr(text_encoder, "encode_ids", None))
             and getattr(text_encoder, "max_chunks", 1) == 1 and not getattr(text_encoder, "cache_size", 0))
    rows_of = text_encoder.cache_rows  # the context as cached rows (SD3's: + the pooled row)
    if not split:
        return [lambda: torch.cat([rows_of(text_encoder(chunk)) for chunk in chunks])], rows
    ids = text_encoder.tokenize(unique)  # (N, L): padded to max_length, each row its own prompt's
    return [lambda s=s: rows_of(text_encoder.encode_ids(ids[s:s + step])) for s in range(0, len(unique), step)], rows


def encode_captions(text_encoder: torch.nn.Module, captions: list[str], device: torch.device) -> torch.Tensor:
    """The cached context rows of ``captions`` (B, rows, D), as the cache stores them, in one thread."""
    tasks, rows = caption_tasks(text_encoder, captions, device)
    return torch.cat(run_side_by_side(tasks, 1))[rows]


def make_encode(autoencoder: torch.nn.Module, text_encoder: torch.nn.Module | None, store: str) -> Callable:
    """The encode function the data library calls: a batch of images + captions -> the rows of the cache
    (the first stage in `micro_batch` slices, each distinct caption through the text encoder once; on a CPU with
    free cores, the slices and the caption chunks run side by side: `encode_threads`)."""
    try:
        param = next(autoencoder.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32

    def first_stage(x: torch.Tensor) -> dict:
        if store == "posterior":
            posterior = autoencoder.encode(x)  # the VAE's diagonal Gaussian, unscaled (z ~ q(z|x))
            return {"mean": posterior.mean, "logvar": posterior.logvar}
        return {"latents": autoencoder.encode_latents(x, sample=False)}

    @torch.no_grad()
    def encode(images: torch.Tensor, captions: list[str], generator=None) -> dict:
        x = images.to(device, dtype)
        step = micro_batch(device, x.shape[-1] * x.shape[-2], len(x))
        texts, text_rows = caption_tasks(text_encoder, list(captions), device) if text_encoder is not None \
            else ([], [])
        slices = [partial(first_stage, x[s:s + step]) for s in range(0, len(x), step)]
        done = run_side_by_side([*texts, *slices], encode_threads(device))  # the longer text tasks first
        parts = done[len(texts):]
        rows = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        if text_encoder is not None:
            rows["context"] = torch.cat(done[:len(texts)])[text_rows]
        return rows

    return encode


def encode_training_set(module, datamodule, root: str | Path, *, rank: int = 0, seed: int = 0,
                        batch_size: int = 64, progress: bool = True, part_size: int = PART_SIZE) -> CachedView | None:
    """Sync the cache of `datamodule.train_dataset` and train from it. Every rank takes part: each claims whole
    parts (of `part_size` rows) and encodes them, then waits for the parts the others build.

    The images are decoded by the datamodule's DataLoader workers (``data.num_workers``) while the frozen networks
    encode (`make_encode`). Returns the view, or None when the data cannot be cached (a random crop: trained on the
    fly). The original dataset stays available as ``datamodule.source_dataset`` (callbacks read its resolution and
    captions)."""
    datamodule.setup("fit")
    source = datamodule.train_dataset
    spec = spec_of(source)
    if spec.random_crop:
        message = ("data.latent_cache: the training images are cropped at random (center_crop=false), which a "
                   "cache cannot hold; every batch is encoded on the fly instead (set data.train.center_crop=true "
                   "to cache, or data.latent_cache=null to silence this)")
        log.warning(message)
        print(f"WARNING {message}")
        return None
    store = "posterior" if module.sample_posterior else "mode"
    text_encoder = module.text_encoder if text_encoder_is_frozen(module.text_encoder) else None
    if text_encoder is not None and not (contexts_cacheable(spec) and text_encoder.max_chunks == 1
                                         and text_encoder.context_cacheable):
        # random caption options change the caption each epoch; long prompts give contexts of different lengths;
        # SDXL's {crossattn, pooled} pair is encoded live (SD3's is cached as rows, the pooled vector last): the
        # cache holds captions, encoded every step
        # (the encoder's cache_size memoises them per string)
        text_encoder = None
    folder = cache_folder(root, spec, module.autoencoder, store, text_encoder)
    options = dict(store=store, text="context" if text_encoder is not None else "caption",
                   scaling_factor=float(module.autoencoder.scaling_factor),
                   shift_factor=float(module.autoencoder.shift_factor), seed=seed, batch_size=batch_size,
                   num_workers=datamodule.num_workers, progress=progress,
                   description={"dataset": shared_config(spec.settings)})  # no folder of the user's
    encode = make_encode(module.autoencoder, text_encoder, store)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the run's random streams must not depend on the cache state
        # every rank: each claims whole parts and encodes them, then waits for the parts the others build
        view = sync_cache(folder, spec, encode, part_size=part_size, **options)
    if view.encoded:
        log.info("latent cache %s: %d image(s) encoded by rank %d in %.1f s", folder, view.encoded, rank,
                 time.perf_counter() - start)
    elif rank == 0:
        print(f"training from the latent cache {folder} (nothing new to encode)")
    datamodule.source_dataset = source
    # a dataset that pairs its rows (DreamBooth: instance + class) reads them from the view; others are the view
    datamodule.train_dataset = source.with_cache(view) if isinstance(source, PairedRows) else view
    return view

