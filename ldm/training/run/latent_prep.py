"""The automatic latent cache of train(cfg): encode the training set once with the frozen VAE (and the frozen text
encoder), then train from the cache.

The VAE and the text encoder are frozen, so encoding every image and caption again each epoch buys nothing. With
``data.latent_cache=<root>`` (the default of data=shapes / folder / hf / webdataset) train(cfg) keeps
``<root>/<Dataset>-<16 hex>/`` in step with the training set (`ldm.data.auto_cache.sync_cache`, with a progress bar;
only new or changed images are encoded, a killed build is finished next time) and swaps the training dataset for
a view of it that draws a fresh latent per sample and epoch (seeded by seed, epoch and index: resumes stay exact).

The folder name is a hash of what the cache depends on besides the images themselves: the dataset's settings
(root, transform), the VAE's weights and scaling, the text encoder's weights (when contexts are cached), the store
and the precision the networks ran in. The images are keyed one by one inside it (for a folder: path, size, mtime,
caption).

Precision (``data.latent_cache_dtype``): the frozen networks encode under autocast in the device's best dtype
(``auto``: bfloat16 where the device computes it natively: a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX;
float32 elsewhere), as kohya's and diffusers' scripts run their frozen VAE in the training's half precision. The
rows are stored in float32 either way; ``float32`` keeps the bits of an fp32 on-the-fly run. A batch whose rows come
out non-finite in half precision (float16 overflows SDXL's VAE) is encoded again in float32, and counted.

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
from contextlib import contextmanager
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
                 text_encoder: torch.nn.Module | None = None, precision: torch.dtype = torch.float32) -> Path:
    """``<root>/<kind>-<16 hex>``: one folder per (dataset settings, VAE weights, store, text encoder weights,
    precision of the encoding; a float32 cache keeps the name it had before precision was a setting)."""
    extra: list[Any] = [json.dumps(spec.settings, sort_keys=True, default=str), store,
                        autoencoder.scaling_factor, autoencoder.shift_factor]
    if text_encoder is not None:
        extra.append(weights_fingerprint(text_encoder))
    if precision != torch.float32:
        extra.append(f"encoded in {precision}")
    fingerprint = weights_fingerprint(autoencoder, *extra)
    return Path(root).expanduser() / f"{spec.settings.get('kind', 'dataset')}-{fingerprint[:16]}"


def text_encoder_is_frozen(text_encoder: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in text_encoder.parameters())


# How many images the frozen networks see at once while the cache is built (issue 28, bench/README.md "The first
# epoch"). On the CPU the VAE's convolutions are fastest on a few images at a time: at 64 px (SD-1.5's VAE, fp32,
# one thread) 1-8 images took ~85 ms each, 32-64 images ~160-300 ms each, their activations no longer fitting the
# CPU's caches; so a micro-batch there holds at most CPU_ENCODE_PIXELS pixels. On a GPU the whole loader batch.
CPU_ENCODE_PIXELS = 8 * 64 * 64
# On a GPU the whole loader batch up to this many pixels a call (8 images at 512 px, 2 at 1024): the SD VAE
# encoder's activations at 512 px are a few hundred MB an image, so a batch of 64 at 1024 px would not fit.
GPU_ENCODE_PIXELS = 8 * 512 * 512
CPU_TEXT_BATCH = 8  # CLIP ViT-L/14 size on the CPU: 8 prompts ~125 ms each, 1 ~190 ms, 32 ~140 ms
CPU_ENCODE_THREADS = 8  # at most this many calls of the frozen networks at once (encode_threads)


ENCODE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively (so it is faster than float32 there, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def encode_precision(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen networks encode the cache in: ``data.latent_cache_dtype`` (auto / float32 / bfloat16 /
    float16). auto: bfloat16 where the device runs it natively (an SD-1.5-sized VAE encodes ~2x and a CLIP-L text
    encoder ~3.5x faster on a Zen 4 core than in float32; tensor cores on a GPU), else float32. Never float16 on
    its own: SDXL's VAE overflows there."""
    setting = str(setting).lower()
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if setting not in ENCODE_DTYPES:
        raise ValueError(f"data.latent_cache_dtype: {setting!r} is not one of auto, {', '.join(ENCODE_DTYPES)}")
    return ENCODE_DTYPES[setting]


def micro_batch(device: torch.device, pixels: int, batch: int) -> int:
    """Images per call of the first stage while caching: few on the CPU, many on a GPU (within its memory)."""
    limit = CPU_ENCODE_PIXELS if device.type == "cpu" else GPU_ENCODE_PIXELS
    return max(1, min(batch, limit // max(1, pixels)))


def cache_device(accelerator: Any = "auto", devices: Any = "auto") -> torch.device:
    """The device this process builds the cache on: the one it trains on (``trainer.accelerator`` /
    ``trainer.devices``; under DDP the LOCAL_RANK-th of them). The cache is built before Lightning moves the module,
    so without this a GPU run would encode its whole training set on the CPU."""
    from ldm.training.build.precision import autocast_device  # the one reading of trainer.accelerator

    kind = autocast_device(accelerator)
    if kind == "cuda" and torch.cuda.is_available():
        if isinstance(devices, str):  # "0,1": those GPUs; "auto" / "2": the first ones
            devices = [d for d in devices.split(",") if d.strip()] if "," in devices else None
        listed = devices is not None and not isinstance(devices, int)
        ids = [int(d) for d in devices] if listed else list(range(torch.cuda.device_count()))
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return torch.device("cuda", ids[local % len(ids)] if ids else 0)
    if kind == "mps" and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextmanager
def on_device(modules: list[torch.nn.Module], device: torch.device | None):
    """The modules on ``device`` inside (None: where they are), back where each was afterwards (Lightning moves
    the whole module itself when fit starts); a GPU's cache of freed blocks emptied."""
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    try:
        for module in modules:
            if device is not None:
                module.to(device)
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()


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


def make_encode(autoencoder: torch.nn.Module, text_encoder: torch.nn.Module | None, store: str,
                precision: torch.dtype = torch.float32) -> Callable:
    """The encode function the data library calls: a batch of images + captions -> the rows of the cache, float32
    (the first stage in `micro_batch` slices, each distinct caption through the text encoder once; on a CPU with
    free cores, the slices and the caption chunks run side by side: `encode_threads`). ``precision`` below float32:
    the networks run under autocast in it (thread-local, so entered in each task); a batch with non-finite rows is
    encoded again in float32 (``encode.fallbacks`` counts those batches)."""
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

    def in_precision(task: Callable, half: torch.dtype | None) -> Callable:
        if half is None:
            return task
        return lambda: torch.autocast(device.type, dtype=half)(task)()

    def encode_once(x: torch.Tensor, captions: list[str], half: torch.dtype | None) -> dict:
        step = micro_batch(device, x.shape[-1] * x.shape[-2], len(x))
        texts, text_rows = caption_tasks(text_encoder, captions, device) if text_encoder is not None else ([], [])
        slices = [partial(first_stage, x[s:s + step]) for s in range(0, len(x), step)]
        tasks = [in_precision(task, half) for task in (*texts, *slices)]
        done = run_side_by_side(tasks, encode_threads(device))  # the longer text tasks first
        parts = done[len(texts):]
        rows = {name: torch.cat([part[name] for part in parts]).float() for name in parts[0]}
        if text_encoder is not None:
            rows["context"] = torch.cat(done[:len(texts)])[text_rows].float()
        return rows

    half = precision if precision != torch.float32 and dtype == torch.float32 else None

    @torch.no_grad()
    def encode(images: torch.Tensor, captions: list[str], generator=None) -> dict:
        x = images.to(device, dtype)
        rows = encode_once(x, list(captions), half)
        if half is not None and not all(bool(torch.isfinite(r).all()) for r in rows.values()):
            encode.fallbacks += 1  # float16 overflow (SDXL's VAE): this batch in float32 instead
            rows = encode_once(x, list(captions), None)
        return rows

    encode.fallbacks = 0
    return encode


def encode_training_set(module, datamodule, root: str | Path, *, rank: int = 0, seed: int = 0,
                        batch_size: int = 64, progress: bool = True, part_size: int = PART_SIZE,
                        precision: str = "auto", device: torch.device | None = None) -> CachedView | None:
    """Sync the cache of `datamodule.train_dataset` and train from it. Every rank takes part: each claims whole
    parts (of `part_size` rows) and encodes them, then waits for the parts the others build.

    The images are decoded by the datamodule's DataLoader workers (``data.num_workers``) while the frozen networks
    encode (`make_encode`). Returns the view, or None when the data cannot be cached (a random crop: trained on the
    fly). The original dataset stays available as ``datamodule.source_dataset`` (callbacks read its resolution and
    captions). ``precision``: data.latent_cache_dtype (`encode_precision`); ``device``: where the frozen networks
    encode (`cache_device`; they go back where they were afterwards), None: where they are."""
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
    home = next(module.autoencoder.parameters(), torch.empty(0)).device
    device = torch.device(device) if device is not None else home
    dtype = encode_precision(precision, device)
    folder = cache_folder(root, spec, module.autoencoder, store, text_encoder, dtype)
    options = dict(store=store, text="context" if text_encoder is not None else "caption",
                   scaling_factor=float(module.autoencoder.scaling_factor),
                   shift_factor=float(module.autoencoder.shift_factor), seed=seed, batch_size=batch_size,
                   num_workers=datamodule.num_workers, progress=progress,
                   description={"dataset": shared_config(spec.settings)})  # no folder of the user's
    start = time.perf_counter()
    with on_device([net for net in (module.autoencoder, text_encoder) if net is not None], device):
        encode = make_encode(module.autoencoder, text_encoder, store, dtype)
        with torch.random.fork_rng(devices=[]):  # the run's random streams must not depend on the cache state
            # every rank: each claims whole parts and encodes them, then waits for the parts the others build
            view = sync_cache(folder, spec, encode, part_size=part_size, **options)
    if view.encoded:
        log.info("latent cache %s: %d image(s) encoded by rank %d on %s in %.1f s (%s)", folder, view.encoded, rank,
                 device, time.perf_counter() - start, str(dtype).removeprefix("torch."))
    elif rank == 0:
        print(f"training from the latent cache {folder} (nothing new to encode)")
    if encode.fallbacks:
        message = (f"data.latent_cache_dtype: {encode.fallbacks} batch(es) gave non-finite latents in "
                   f"{str(dtype).removeprefix('torch.')} and were encoded again in float32 (set "
                   "data.latent_cache_dtype=float32 or bfloat16 to skip the first try)")
        log.warning(message)
        print(f"WARNING {message}")
    datamodule.source_dataset = source
    # a dataset that pairs its rows (DreamBooth: instance + class) reads them from the view; others are the view
    datamodule.train_dataset = source.with_cache(view) if isinstance(source, PairedRows) else view
    return view

