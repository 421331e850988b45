"""Safetensors files written byte for byte the same by every process (the latent cache's shards, which several
processes build and a test compares with a one-process build)."""

from __future__ import annotations

import json

import torch


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file as bytes that depend only on its tensors and metadata: the safetensors writer orders
    ``__metadata__`` by a hash that differs per process, so its header is written again here with sorted keys
    (compact JSON, padded with spaces to 8 bytes as the format asks; the data offsets are relative to the data, so
    they stay valid). Two processes that encode the same rows write the same bytes."""
    from safetensors.torch import save

    data = save(state, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]
