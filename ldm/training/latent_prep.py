"""Encode the training set once with the frozen VAE, then train from the cached posteriors.

The VAE is frozen, so encoding every image again each epoch (a quarter of the embedded default's step) buys
nothing: with ``data.latent_cache=<folder>`` train(cfg) writes the training set's posteriors (mean + logvar)
into ``<folder>/<dataset>-<fingerprint>/`` before fitting (with a progress bar; a killed build resumes) and
swaps the training dataset for a `CachedLatentsDataset` over them, which draws a fresh latent per sample and
epoch (seeded by seed, epoch and index, so resumes stay exact). The fingerprint covers the dataset's
`cache_key()` and the VAE's weights and scaling, so another VAE or other data never reads a stale cache.

Only datasets that are a pure function of their parameters (they define ``cache_key()``: the synthetic
shapes) are cached this way; for image folders, HF datasets and shards build a cache explicitly with
``python -m ldm.data.latent_cache`` and train with ``data=latent_cache``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ldm.data.cached_latents import CachedLatentsDataset
from ldm.data.latent_cache import LatentCacheError, build_latent_cache, read_manifest

log = logging.getLogger("ldm.training")

WAIT_SECONDS = 4 * 3600  # how long other ranks wait for rank 0's build


def weights_fingerprint(module: torch.nn.Module, *extra: object) -> str:
    """SHA-256 over a module's parameter/buffer names, shapes, dtypes and bytes, plus `extra` values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(json.dumps([str(e) for e in extra]).encode())
    return digest.hexdigest()


def cache_folder(root: str | Path, dataset: Dataset, autoencoder: torch.nn.Module, store: str) -> Path:
    """``<root>/<Dataset>-<16 hex>``: one folder per (dataset parameters, VAE weights, store)."""
    key = getattr(dataset, "cache_key", None)
    if not callable(key):
        raise ValueError(
            f"data.latent_cache: {type(dataset).__name__} is not a pure function of its parameters (it has no "
            "cache_key()), so a cache could silently go stale. Build one explicitly with "
            "`python -m ldm.data.latent_cache ...` and train with data=latent_cache, or set data.latent_cache=null."
        )
    fingerprint = weights_fingerprint(autoencoder, key(), store, getattr(autoencoder, "scaling_factor", 1.0),
                                      getattr(autoencoder, "shift_factor", 0.0))
    return Path(root).expanduser() / f"{type(dataset).__name__}-{fingerprint[:16]}"


def _complete(folder: Path) -> bool:
    """A finished cache; False for none, or an unreadable manifest (the build then says what is wrong with it)."""
    try:
        return bool(read_manifest(folder).get("complete"))
    except (FileNotFoundError, LatentCacheError):
        return False


def encode_training_set(module, datamodule, root: str | Path, *, rank: int = 0, seed: int = 0,
                        batch_size: int = 64, progress: bool = True) -> CachedLatentsDataset:
    """Build (rank 0; other ranks wait for it) or reuse the cache of `datamodule.train_dataset`, and train from it.

    The original dataset stays available as ``datamodule.source_dataset`` (callbacks read its resolution and,
    for the shapes, its colours and captions)."""
    datamodule.setup("fit")
    source = datamodule.train_dataset
    store = "posterior" if module.sample_posterior else "mode"
    folder = cache_folder(root, source, module.autoencoder, store)
    if not _complete(folder):
        if rank == 0:
            print(f"encoding the training set once with the frozen VAE into {folder}")
            start = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # the run's random streams must not depend on the cache state
                build_latent_cache(source, folder, module.autoencoder, None, store=store, text="caption",
                                   batch_size=batch_size, seed=seed, progress=progress,
                                   description={"dataset": repr(source), "cache_key": str(source.cache_key())})
            log.info("latent cache %s written in %.1f s", folder, time.perf_counter() - start)
        else:
            _wait_for(folder)
    else:
        log.info("training from the latent cache %s", folder)
    datamodule.source_dataset = source
    datamodule.train_dataset = CachedLatentsDataset(folder, sample=module.sample_posterior, seed=seed)
    return datamodule.train_dataset


def _wait_for(folder: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not _complete(folder):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not finish the latent cache {folder} within {WAIT_SECONDS} s")
        time.sleep(2.0)
