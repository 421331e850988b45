"""Encode a dataset once: VAE latents (+ text contexts) into safetensors shards with a JSON manifest.

A frozen first stage and a frozen text encoder give the same output for the same image and caption every
epoch, so training can read them from disk instead of running both networks in every step
(`ldm.data.cached_latents.CachedLatentsDataset` reads what this writes).

    python -m ldm.cli.latent_cache OUT --source folder --path images/ --resolution 512 \\
        --vae-weights sd15.safetensors --text-encoder path/to/sd15-diffusers-folder

Layout of OUT:
    manifest.json               settings, latent / context shapes, scaling factors, finished shards
    shard-00000.safetensors     per sample: "mean" + "logvar" (store="posterior": the VAE's diagonal Gaussian,
                                unscaled, so training can draw a fresh latent every epoch) or "latents"
                                (store="sample" / "mode": already scaled), "context" (text="context"),
                                "index" (the source index); the captions are in the file's metadata.

Shard k holds source samples [k * shard_size, (k + 1) * shard_size). Each shard is written to a temporary file
and renamed, then recorded in the manifest (also written atomically): a killed run leaves only whole shards,
and running the same command again skips the recorded ones.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ldm.formats.safetensors_bytes import safetensors_bytes
from ldm.formats.dtypes import DTYPES as ALL_DTYPES
from ldm.formats.safe_build import INT, Param, check_kwargs, check_plain
from ldm.formats.safe_load import CheckpointError
from ldm.formats.safe_paths import inside

logger = logging.getLogger("ldm.data")

FORMAT = "ldm-latent-cache"
VERSION = 1
MANIFEST = "manifest.json"
STORES = ("posterior", "sample", "mode")
TEXTS = ("context", "caption")
DTYPES = {name: ALL_DTYPES[name] for name in ("float32", "float16", "bfloat16")}  # storage dtypes
# settings that must agree between a partial cache and the run that resumes it
RESUME_KEYS = ("store", "text", "shard_size", "dtype", "limit", "seed", "scaling_factor", "shift_factor")


class LatentCacheError(ValueError):
    """A latent cache is missing, corrupt, incomplete or was written with other settings."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# -----------------------------------------------------------------------------
# manifest


def read_manifest(path: str | Path) -> dict:
    """The manifest of the cache folder `path` (or of the manifest file itself), validated."""
    path = Path(path).expanduser()
    file = path if path.name == MANIFEST or path.is_file() else path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(
            f"no latent cache at {file.parent}: {MANIFEST} is missing. Build one with "
            f"`python -m ldm.cli.latent_cache {file.parent} --source ...` (see --help)"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise LatentCacheError(
            f"latent cache manifest {file} is corrupt ({error}). Rebuild the cache: run the build command "
            f"again with --overwrite"
        ) from None
    _check_manifest(manifest, file)
    return manifest


def _check_manifest(manifest: Any, file: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LatentCacheError(f"{file} is not a latent cache manifest (no \"format\": \"{FORMAT}\")")
    check_plain(manifest, source=str(file), key="manifest", max_list=10**8)  # data only: no _target_ / _args_ / ... anywhere
    for key in ("latent_shape", "context_shape"):
        check_kwargs({key: manifest.get(key) or []}, {key: Param(INT, 1, 65536, list_of=True)}, source=str(file),
                     key="manifest")
    if manifest.get("version") != VERSION:
        raise LatentCacheError(f"{file}: manifest version {manifest.get('version')!r}, this code reads {VERSION}")
    required = ("store", "text", "shard_size", "dtype", "latent_shape", "scaling_factor", "shift_factor", "shards")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise LatentCacheError(f"latent cache manifest {file} is corrupt: missing {missing}")
    if manifest["store"] not in STORES or manifest["text"] not in TEXTS:
        raise LatentCacheError(f"latent cache manifest {file} is corrupt: store={manifest['store']!r}, "
                               f"text={manifest['text']!r}")
    if not isinstance(manifest["shards"], list):
        raise LatentCacheError(f"latent cache manifest {file} is corrupt: shards is not a list")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or not {"file", "start", "count"} <= shard.keys():
            raise LatentCacheError(f"latent cache manifest {file} is corrupt: bad shard entry {shard!r}")
        if not all(type(shard[k]) is int and shard[k] >= 0 for k in ("start", "count")):
            raise LatentCacheError(f"{file}: shards[{i}]: start and count must be whole numbers >= 0, got "
                                   f"{shard['start']!r}, {shard['count']!r}")
        try:  # a manifest from elsewhere names only shards of its own folder: no '../', no absolute path, no link out
            inside(file.parent, shard["file"], source=str(file), key=f"shards[{i}].file")
        except CheckpointError as error:
            raise LatentCacheError(str(error)) from None


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# encoding


def _posterior(vae, x: torch.Tensor):
    """Our AutoencoderKL.encode -> DiagonalGaussian; diffusers' returns an output with .latent_dist."""
    out = vae.encode(x)
    return getattr(out, "latent_dist", out)


def _factor(vae, name: str, default: float) -> float:
    if hasattr(vae, name):
        return float(getattr(vae, name))
    config = getattr(vae, "config", None)
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return default if value is None else float(value)


def _module_device(module, fallback: torch.device) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return fallback


# per-sample images a cache keeps as they are, beside the latents (uint8: pixel / 255 values round-trip exactly):
# a ControlNet pair's control image
PIXEL_ROWS = ("conditioning_image",)


def _collate(samples: list[dict]) -> dict:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [str(s.get("caption", "")) for s in samples],
    }
    for name in PIXEL_ROWS:
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


def pixel_rows(batch: dict) -> dict[str, torch.Tensor]:
    """The batch's PIXEL_ROWS ([0, 1] images) as the uint8 rows a shard stores."""
    return {name: (batch[name].float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
            for name in PIXEL_ROWS if name in batch}


class _Encoder:
    """Batch of images + captions -> the tensors one shard row holds (on the CPU, in the storage dtype)."""

    def __init__(self, vae, text_encoder, store: str, text: str, dtype: torch.dtype, device, amp: str | None,
                 scaling_factor: float, shift_factor: float):
        self.vae, self.text_encoder, self.store, self.text = vae, text_encoder, store, text
        self.dtype, self.device = dtype, torch.device(device)
        self.scale, self.shift = scaling_factor, shift_factor
        self.amp = amp
        try:
            self.vae_dtype = next(vae.parameters()).dtype
        except (AttributeError, StopIteration, TypeError):
            self.vae_dtype = torch.float32

    def _autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.amp])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str], generator: torch.Generator | None) -> dict:
        x = images.to(self.device, self.vae_dtype, non_blocking=True)
        out = {}
        with self._autocast():
            posterior = _posterior(self.vae, x)
            if self.store == "posterior":
                out["mean"], out["logvar"] = posterior.mean, posterior.logvar
            else:
                if self.store == "sample":
                    z = posterior.mean + posterior.std * torch.randn(
                        posterior.mean.shape, generator=generator, device=generator.device,
                        dtype=torch.float32).to(posterior.mean.device, posterior.mean.dtype)
                else:
                    z = posterior.mean
                out["latents"] = (z.float() - self.shift) * self.scale  # encode_latents' scaling
            if self.text == "context":
                # (B, L, D) from any callable; a context with a pooled vector (SD3's dict) as the encoder's L + 1
                # rows (ldm.models.context_rows)
                context = self.text_encoder(list(captions))
                out["context"] = context if torch.is_tensor(context) else self.text_encoder.cache_rows(context)
        return {k: v.detach().to("cpu", self.dtype).contiguous() for k, v in out.items()}


class _EncodeFunction:
    """A caller's encode function as an `_Encoder`: rows on the CPU, in the storage dtype."""

    def __init__(self, encode, dtype: torch.dtype, device):
        self.encode, self.dtype, self.device = encode, dtype, torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str], generator: torch.Generator | None) -> dict:
        out = self.encode(images, list(captions), generator)
        return {k: v.detach().to("cpu", self.dtype).contiguous() for k, v in out.items()}


def _write_shard(path: Path, rows: dict[str, list[torch.Tensor]], captions: list[str], indices: list[int],
                 k: int) -> int:
    tensors = {name: torch.cat(parts) for name, parts in rows.items()}
    tensors["index"] = torch.as_tensor(indices, dtype=torch.int64)
    metadata = {"format": FORMAT, "shard": str(k), "captions": json.dumps(captions)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # the same rows give the same bytes, whichever process writes them
        f.write(safetensors_bytes(tensors, metadata))
        f.flush()  # the rename below must not expose a shard whose bytes are still in flight
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def _progress(total: int | None, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True)


def _check_options(store: str, text: str | None, has_text_encoder: bool, has_encode: bool, dtype: str,
                   shard_size: int, batch_size: int) -> str:
    """build_latent_cache's choices checked; returns what ``text`` stands for (its default filled in)."""
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")
    text = text or ("context" if has_text_encoder else "caption")
    if text not in TEXTS:
        raise ValueError(f"text must be one of {TEXTS}, got {text!r}")
    if text == "context" and not (has_text_encoder or has_encode):
        raise ValueError("text='context' needs a text_encoder (or use text='caption' to store captions only)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if int(shard_size) <= 0 or int(batch_size) <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
    return text


def _limit(num_samples: int | None, max_samples: int | None) -> int | None:
    """The samples to encode: all of a sized source, at most max_samples; None: an iterable source, to its end."""
    if max_samples is None:
        return num_samples
    return int(max_samples) if num_samples is None else min(int(max_samples), num_samples)


@contextmanager
def _eval_mode(*modules):
    """The networks in eval mode while they encode, each back in its own mode afterwards."""
    was_training = [(m, m.training) for m in modules if isinstance(m, torch.nn.Module)]
    for module, _ in was_training:
        module.eval()
    try:
        yield
    finally:
        for module, mode in was_training:
            module.train(mode)


def build_latent_cache(
    source: Dataset | IterableDataset,
    out_dir: str | Path,
    vae,
    text_encoder: Callable[[list[str]], torch.Tensor] | None = None,
    *,
    store: str = "posterior",
    text: str | None = None,
    shard_size: int = 1024,
    batch_size: int = 32,
    num_workers: int = 0,
    dtype: str = "float32",
    amp: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    description: dict | None = None,
    encode: Callable[[torch.Tensor, list[str], torch.Generator | None], dict] | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
) -> dict:
    """Encode every sample of `source` into `out_dir`; returns the manifest.

    Args:
        source: any image/caption dataset of `ldm.data` (map-style or iterable; an iterable one must yield the
            same order on every run for resuming, e.g. WebDatasetSource(shuffle_buffer=0, shuffle_shards=False)).
        vae: first stage with `.encode(x) -> posterior (.mean, .logvar, .std)` and `scaling_factor` /
            `shift_factor` (our AutoencoderKL; diffusers' AutoencoderKL works too).
        text_encoder: callable list[str] -> (B, L, D), e.g. CLIPTextEncoder; None stores captions only.
        store: "posterior" (mean + logvar: CachedLatentsDataset samples a new latent per index and epoch),
            "sample" (one scaled sample, drawn from `seed`) or "mode" (the scaled mean).
        text: "context" (the text encoder's output) or "caption" (strings only); default: "context" when a
            text encoder is given. Captions are always kept in the shards' metadata.
        shard_size: samples per shard file (the unit of resuming).
        batch_size, num_workers: the DataLoader that reads `source`.
        dtype: storage dtype of the tensors ("float32", "float16", "bfloat16").
        amp: None, "bf16" or "fp16": run the encoders under autocast.
        device: where to run the encoders; default: the VAE's device.
        max_samples: encode only the first `max_samples` samples.
        overwrite: delete an existing cache in `out_dir` first (otherwise it is resumed).
        description: extra info stored in the manifest (e.g. how the source was built), as plain data: what is not
            JSON data (an object) is stored as its class name, never its repr.
        encode: instead of `vae` / `text_encoder`, a callable (images, captions, generator) -> {"mean", "logvar"}
            (store="posterior") or {"latents"}, plus "context" (text="context"): the rows of one batch, so the
            caller (ldm.training) owns the networks; vae may then be None, and scaling_factor / shift_factor
            say how its latents are scaled.
    """
    text = _check_options(store, text, text_encoder is not None, encode is not None, dtype, shard_size, batch_size)
    shard_size, batch_size = int(shard_size), int(batch_size)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else _module_device(vae, torch.device("cpu"))

    iterable = isinstance(source, IterableDataset) or not hasattr(source, "__len__")
    settings = dict(store=store, text=text, shard_size=shard_size, dtype=dtype,
                    limit=_limit(None if iterable else len(source), max_samples), seed=int(seed),
                    scaling_factor=float(_factor(vae, "scaling_factor", 1.0) if scaling_factor is None
                                         else scaling_factor),
                    shift_factor=float(_factor(vae, "shift_factor", 0.0) if shift_factor is None else shift_factor))
    manifest = _start_manifest(out, settings, overwrite)
    manifest.update(source=dataset_name(source), vae=_config(vae), text_encoder=_config(text_encoder),
                    description=plain_data(description or {}))
    if encode is None:
        encoder = _Encoder(vae, text_encoder, store, text, DTYPES[dtype], device, amp,
                           manifest["scaling_factor"], manifest["shift_factor"])
    else:
        encoder = _EncodeFunction(encode, DTYPES[dtype], device)
    loader_kwargs = dict(batch_size=batch_size, num_workers=int(num_workers), collate_fn=_collate,
                         pin_memory=device.type == "cuda")
    with _eval_mode(vae, text_encoder):
        if iterable:
            _encode_stream(source, out, manifest, encoder, loader_kwargs, progress)
        else:
            _encode_ranges(source, out, manifest, encoder, loader_kwargs, progress)
    manifest["complete"] = True
    manifest["num_samples"] = sum(s["count"] for s in manifest["shards"])
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def dataset_name(source: Dataset) -> str:
    """The class name of the dataset under the wrappers a cache reads it through (torch's Subset: ``.dataset``;
    a part's plan, a doubled stream: ``.source``). The manifest holds it, not the dataset's repr: that is
    ``<... object at 0x7f...>``, an address of the process that wrote it."""
    for _ in range(16):
        inner = getattr(source, "dataset", None)
        inner = inner if isinstance(inner, Dataset) else getattr(source, "source", None)
        if not isinstance(inner, Dataset):
            break
        source = inner
    return type(source).__name__


def plain_data(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON data (dicts with string keys, lists, strings, finite numbers, booleans, None), anything
    else by its class name: what a manifest stores describes the data, never a Python object."""
    if depth > 32:
        return type(value).__name__
    if isinstance(value, dict):
        return {str(k): plain_data(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, depth + 1) for v in value]
    if value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return type(value).__name__


def _config(module) -> Any:
    if module is None:
        return None
    config = getattr(module, "config", None)
    if isinstance(config, dict):
        try:
            return json.loads(json.dumps(config))
        except TypeError:
            pass
    return type(module).__name__


def _start_manifest(out: Path, settings: dict, overwrite: bool) -> dict:
    """A fresh manifest, or the existing one (same settings) whose finished shards are kept."""
    file = out / MANIFEST
    if overwrite:
        for path in out.glob("shard-*.safetensors*"):
            path.unlink()
        file.unlink(missing_ok=True)
    fresh = dict(format=FORMAT, version=VERSION, complete=False, **settings, num_samples=settings["limit"],
                 latent_shape=None, context_shape=None,
                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), shards=[])
    if not file.exists():
        if any(out.glob("shard-*.safetensors")):
            logger.warning("latent cache %s: shard files without a manifest; they are encoded again", out)
        return fresh
    old = read_manifest(file)  # raises on a corrupt manifest: never guess what a shard holds
    differ = {k: (old.get(k), settings[k]) for k in RESUME_KEYS if old.get(k) != settings[k]}
    if differ:
        raise LatentCacheError(
            f"latent cache {out} was written with other settings "
            + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            + ". Pass overwrite=True (--overwrite) to rebuild it, or another output folder."
        )
    kept = [s for s in old["shards"] if (out / s["file"]).is_file()
            and ("bytes" not in s or (out / s["file"]).stat().st_size == s["bytes"])]
    if len(kept) < len(old["shards"]):
        logger.warning("latent cache %s: %d recorded shard(s) missing or truncated; encoding them again",
                       out, len(old["shards"]) - len(kept))
    fresh.update(latent_shape=old.get("latent_shape"), context_shape=old.get("context_shape"),
                 created=old.get("created", fresh["created"]), shards=kept)
    return fresh


def _record(out: Path, manifest: dict, entry: dict, rows: dict) -> None:
    """Add a written shard to the manifest and write it (atomically)."""
    if manifest["latent_shape"] is None:
        name = "mean" if "mean" in rows else "latents"
        manifest["latent_shape"] = list(rows[name][0].shape[1:])
        if "context" in rows:
            manifest["context_shape"] = list(rows["context"][0].shape[1:])
    manifest["shards"] = sorted([s for s in manifest["shards"] if s["file"] != entry["file"]] + [entry],
                                key=lambda s: s["start"])
    _write_json_atomic(out / MANIFEST, manifest)


def _shard_generator(manifest: dict, k: int, device: torch.device) -> torch.Generator | None:
    if manifest["store"] != "sample":
        return None
    return torch.Generator(device=device).manual_seed(manifest["seed"] * 1_000_003 + k)


def _encode_ranges(source, out: Path, manifest: dict, encoder: _Encoder, loader_kwargs: dict, progress: bool):
    """Map-style source: shard k is the index range [k * S, (k + 1) * S); finished shards are skipped."""
    n, size = manifest["limit"], manifest["shard_size"]
    done = {s["start"] for s in manifest["shards"]}
    todo = [k for k in range(math.ceil(n / size)) if k * size not in done]
    bar = _progress(n, n - sum(min(size, n - k * size) for k in todo), progress, f"encoding {out.name}")
    try:
        for k in todo:
            start, stop = k * size, min((k + 1) * size, n)
            rows: dict[str, list[torch.Tensor]] = {}
            captions, indices = [], []
            generator = _shard_generator(manifest, k, encoder.device)
            loader = DataLoader(Subset(source, range(start, stop)), shuffle=False, **loader_kwargs)
            position = start
            for batch in loader:
                encoded = {**encoder(batch["image"], batch["caption"], generator), **pixel_rows(batch)}
                for name, value in encoded.items():
                    rows.setdefault(name, []).append(value)
                captions += batch["caption"]
                count = len(batch["caption"])
                indices += [position + i for i in range(count)]  # the source index each row was read from
                position += count
                if bar is not None:
                    bar.update(count)
            path = out / shard_name(k)
            nbytes = _write_shard(path, rows, captions, indices, k)
            _record(out, manifest, dict(file=path.name, start=start, count=stop - start, bytes=nbytes), rows)
    finally:
        if bar is not None:
            bar.close()


def _encode_stream(source, out: Path, manifest: dict, encoder: _Encoder, loader_kwargs: dict, progress: bool):
    """Iterable source: read in order; the recorded prefix of shards is skipped (its images are not encoded)."""
    size, limit = manifest["shard_size"], manifest["limit"]
    shards = sorted(manifest["shards"], key=lambda s: s["start"])
    prefix = []
    for k, s in enumerate(shards):  # keep the contiguous prefix of whole shards only
        if s["start"] != k * size or s["count"] != size:
            break
        prefix.append(s)
    manifest["shards"] = prefix
    skip = len(prefix) * size
    k, position = len(prefix), 0
    rows: dict[str, list[torch.Tensor]] = {}
    captions: list[str] = []
    generator = None
    bar = _progress(limit, skip, progress, f"encoding {out.name}")

    def flush():
        nonlocal rows, captions, k
        path = out / shard_name(k)
        count = len(captions)
        nbytes = _write_shard(path, rows, captions, list(range(k * size, k * size + count)), k)
        _record(out, manifest, dict(file=path.name, start=k * size, count=count, bytes=nbytes), rows)
        rows, captions, k = {}, [], k + 1

    try:
        for batch in _batches(source, loader_kwargs):
            images, caps = batch["image"], batch["caption"]
            if limit is not None:
                images, caps = images[: max(limit - position, 0)], caps[: max(limit - position, 0)]
            lo = min(max(skip - position, 0), len(caps))  # samples of this batch that are already cached
            position += len(caps)
            while lo < len(caps):
                hi = min(len(caps), lo + size - len(captions))
                if not captions:  # a new shard: its own noise stream (store="sample"), as in _encode_ranges
                    generator = _shard_generator(manifest, k, encoder.device)
                for name, value in encoder(images[lo:hi], caps[lo:hi], generator).items():
                    rows.setdefault(name, []).append(value)
                captions += caps[lo:hi]
                if bar is not None:
                    bar.update(hi - lo)
                lo = hi
                if len(captions) == size:
                    flush()
            if limit is not None and position >= limit:
                break
        if captions:
            flush()
    finally:
        if bar is not None:
            bar.close()


def _batches(source, loader_kwargs: dict) -> Iterator[dict]:
    yield from DataLoader(source, **loader_kwargs)
