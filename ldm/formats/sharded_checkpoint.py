"""Sharded training checkpoints: the folder ``trainer=fsdp2`` writes (Lightning's ``ModelParallelStrategy`` with
``save_distributed_checkpoint``, torch.distributed.checkpoint): ``__<rank>_0.distcp`` (each rank's shards),
``.metadata`` (the index: which bytes of which file hold which piece of which tensor) and ``meta.pt`` (Lightning's
other entries: step, callbacks, our ``ldm`` record), read here into the dict a one-file checkpoint holds.

Read as bounded data: ``.metadata`` is a plain pickle (torch.distributed.checkpoint writes it so); it is unpickled
with only the index's own classes allowed (anything else is refused, nothing is imported or called), at most
MAX_INDEX_BYTES. Only the weights (``state_dict.*``) are read, not the optimizer state: every stated piece must lie
inside a file of the folder, and a tensor's stated size must fit in the bytes stored for it before its memory is
allocated; the pieces are read with ``torch.load(weights_only=True)``, ``meta.pt`` too (``load_pickle``)."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from ldm.formats.safe_load import CheckpointError, load_pickle

MAX_INDEX_BYTES = 256 << 20  # SD-XL's full state + AdamW state index is a few MB
INDEX, META = ".metadata", "meta.pt"
WEIGHTS = "state_dict."
_INDEX_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")}


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / INDEX).is_file() and (path / META).is_file()


class _IndexUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: Path):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _INDEX_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.source}: the index names {module}.{name}, which a sharded checkpoint's index "
                              "never holds; refused (nothing was imported)")


def _read_index(folder: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / INDEX
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than a sharded checkpoint's index "
                              f"({MAX_INDEX_BYTES}); refused")
    try:
        index = _IndexUnpickler(path.read_bytes(), path).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign pickle
        raise CheckpointError(f"{path}: not a readable sharded checkpoint index ({type(e).__name__}: {e})") from e
    if not isinstance(index, Metadata) or not isinstance(index.state_dict_metadata, dict) \
            or not isinstance(index.storage_data, dict):
        raise CheckpointError(f"{path}: not a torch.distributed.checkpoint index")
    return index


def _checked_weights(folder: Path, index) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The weights' names, shapes and dtypes, each checked against the bytes the folder holds for it."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    sizes: dict[str, int] = {}
    stored: dict[str, int] = {}
    for key, info in index.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{folder / INDEX}: a piece of {key.fqn} names {name!r}, not a file of the folder")
        if name not in sizes:
            file = folder / name
            if not file.is_file() or file.is_symlink():
                raise CheckpointError(f"{folder}: {name} (named by the index) is missing: an incomplete checkpoint")
            sizes[name] = file.stat().st_size
        if not (0 <= info.offset and 0 <= info.length and info.offset + info.length <= sizes[name]):
            raise CheckpointError(f"{folder / name}: the index states bytes {info.offset}..+{info.length} for "
                                  f"{key.fqn}, past its {sizes[name]} bytes (truncated?)")
        stored[key.fqn] = stored.get(key.fqn, 0) + info.length
    weights = {}
    for fqn, meta in index.state_dict_metadata.items():
        if not fqn.startswith(WEIGHTS) or not isinstance(meta, TensorStorageMetadata):
            continue
        dtype, shape = meta.properties.dtype, torch.Size(meta.size)
        need = math.prod(shape) * dtype.itemsize
        if need > stored.get(fqn, 0):
            raise CheckpointError(f"{folder}: {fqn} states {tuple(shape)} {dtype} ({need} bytes) but the folder "
                                  f"holds {stored.get(fqn, 0)} bytes of it; refused")
        weights[fqn[len(WEIGHTS):]] = (shape, dtype)
    if not weights:
        raise CheckpointError(f"{folder}: the sharded checkpoint holds no weights")
    return weights


def read_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """The folder as one checkpoint dict: ``meta.pt``'s entries and the whole weights in ``state_dict`` (the
    optimizer state is left out: resume from the folder itself, ``ckpt_path``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    folder = Path(path)
    index = _read_index(folder)
    weights = _checked_weights(folder, index)

    class CheckedReader(FileSystemReader):  # the index read and checked above, never unpickled again
        def read_metadata(self, *args: Any, **kwargs: Any):
            return index

    state = {"state_dict": {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in weights.items()}}
    dcp.load(state, storage_reader=CheckedReader(str(folder)), no_dist=True)
    checkpoint = load_pickle(folder / META)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{folder / META}: not a checkpoint's entries")
    checkpoint["state_dict"] = state["state_dict"]
    return checkpoint
