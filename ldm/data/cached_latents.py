"""Training data from a latent cache written by `ldm.data.latent_cache`: no VAE or text encoder in the step.

    dataset = CachedLatentsDataset("cache/")
    dataset[i] -> {"latents": (C, h, w) float32, "context": (L, D) float32 (if cached), "caption": str, "index": int}

"latents" are diffusion latents, scaled like `AutoencoderKL.encode_latents`: (z - shift_factor) * scaling_factor.
A cache of posteriors (store="posterior") draws z = mean + std * eps with eps from a generator seeded by
(seed, epoch, index), so the same index gives the same latent within an epoch, a new one after `set_epoch`,
and any DataLoader worker can produce it; `sample=False` returns the mode (the mean).
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.latent_cache import LatentCacheError, read_manifest

MAX_OPEN_SHARDS = 128
MAX_HEADER = 100_000_000  # bytes of a shard's JSON header (safetensors' own limit)


class CachedLatentsDataset(Dataset):
    """Map-style dataset over the shards of a latent cache.

    Args:
        path: the cache folder (holding manifest.json).
        sample: draw a latent from the cached posterior (store="posterior"); False gives its mean. Ignored for
            caches of a single sample or of the mode.
        seed: seed of the posterior draws.
        allow_incomplete: read the finished shards of a cache still being written (otherwise an error).
        dtype: dtype of the returned tensors.
    """

    def __init__(self, path: str | Path, sample: bool = True, seed: int = 0, allow_incomplete: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        m = self.manifest
        if not m.get("complete") and not allow_incomplete:
            raise LatentCacheError(
                f"latent cache {self.path} is incomplete ({len(m['shards'])} shard(s) finished): run the build "
                f"command again to finish it, or pass allow_incomplete=True"
            )
        self.shards = sorted(m["shards"], key=lambda s: s["start"])
        if not self.shards:
            raise LatentCacheError(f"latent cache {self.path} has no finished shards")
        for shard in self.shards:
            if not (self.path / shard["file"]).is_file():
                raise LatentCacheError(
                    f"latent cache {self.path}: shard {shard['file']} listed in the manifest is missing; run the "
                    f"build command again to re-encode it"
                )
        self.offsets = np.cumsum([0] + [int(s["count"]) for s in self.shards]).tolist()  # dataset index -> shard
        self.store = m["store"]
        self.sample = bool(sample) and self.store == "posterior"
        self.seed = int(seed)
        # shared memory: persistent DataLoader workers keep their copy of the dataset, yet must see set_epoch
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.dtype = dtype
        self.scaling_factor = float(m["scaling_factor"])
        self.shift_factor = float(m["shift_factor"])
        self.has_context = m["text"] == "context"
        self.latent_shape = tuple(m["latent_shape"] or ())
        self.context_shape = tuple(m["context_shape"]) if m.get("context_shape") else None
        self._open: OrderedDict[int, _Shard] = OrderedDict()  # open shards of this process, least recent first

    def __len__(self) -> int:
        return self.offsets[-1]

    def set_epoch(self, epoch: int) -> None:
        """New posterior draws for the next epoch (call it in every process that reads, before iterating)."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def _shard(self, k: int) -> "_Shard":
        if k in self._open:
            self._open.move_to_end(k)
        else:
            self._open[k] = _Shard(self.path / self.shards[k]["file"])
            if len(self._open) > MAX_OPEN_SHARDS:  # each memory map holds a file descriptor
                self._open.popitem(last=False)
        return self._open[k]

    def generator(self, index: int) -> torch.Generator:
        """The generator of index's posterior draw in the current epoch."""
        return torch.Generator().manual_seed(_mix(self.seed, self.epoch, int(index)))

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} cached samples")
        index %= n
        k = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[k]
        shard = self._shard(k)
        if self.store == "posterior":
            mean = shard.row("mean", row).float()  # (C, h, w), unscaled
            if self.sample:
                std = torch.exp(0.5 * shard.row("logvar", row).float())
                z = mean + std * torch.randn(mean.shape, generator=self.generator(index))
            else:
                z = mean
            latents = (z - self.shift_factor) * self.scaling_factor
        else:
            latents = shard.row("latents", row).float()  # already scaled
        item = {"latents": latents.to(self.dtype), "index": index,
                "caption": shard.captions[row] if row < len(shard.captions) else ""}
        if self.has_context:
            item["context"] = shard.row("context", row).to(self.dtype)  # (L, D)
        if "conditioning_image" in shard.arrays:  # a ControlNet pair's control image, stored as uint8 pixels
            item["conditioning_image"] = (shard.row("conditioning_image", row).float() / 255).to(self.dtype)
        return item

    def __getstate__(self):  # DataLoader workers re-open the shards themselves
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (f"CachedLatentsDataset({str(self.path)!r}, {len(self)} samples, store={self.store}, "
                f"latents={self.latent_shape}, context={self.context_shape})")


_NUMPY = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, torch.bfloat16),
          "I64": (np.int64, None), "U8": (np.uint8, None)}
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64 over the values: well-spread generator seeds from (seed, epoch, index)."""
    h = 0
    for v in values:
        h = (h + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class _Shard:
    """Memory-mapped rows of one safetensors shard (the format: u64 header size, JSON header, raw bytes).

    Reading a row copies only that row, in microseconds; safetensors' own slicing costs ~60 us a call."""

    def __init__(self, file: Path):
        self.file = file
        try:
            with open(file, "rb") as f:
                (size,) = np.frombuffer(f.read(8), dtype="<u8")
                size, present = int(size), os.fstat(f.fileno()).st_size - 8
                if size > min(present, MAX_HEADER):  # checked before read(size) allocates it: 2**50 is a claim
                    raise ValueError(f"its header claims {size} bytes; the file holds {present} after the size "
                                     f"field (and a header holds at most {MAX_HEADER})")
                header = json.loads(f.read(size))
            if not isinstance(header, dict):
                raise ValueError(f"its header is a {type(header).__name__}, not a mapping of tensors")
            data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + int(size))
            self.captions = json.loads((header.pop("__metadata__", None) or {}).get("captions", "[]"))
            self.arrays = {}
            for name, info in header.items():
                np_dtype, torch_dtype = _NUMPY[info["dtype"]]
                begin, end = info["data_offsets"]
                array = data[begin:end].view(np_dtype).reshape(info["shape"])
                self.arrays[name] = (array, torch_dtype)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:  # truncated, not safetensors,
            # bad header (nested too deep for json)
            raise LatentCacheError(f"latent cache shard {file} is unreadable ({type(error).__name__}: {error}); "
                                   f"delete it and run the build command again to re-encode it") from None

    def row(self, name: str, i: int) -> torch.Tensor:
        array, torch_dtype = self.arrays[name]
        tensor = torch.from_numpy(np.array(array[i]))  # copy of one row
        return tensor.view(torch_dtype) if torch_dtype is not None else tensor
