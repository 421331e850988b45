"""What the training code may ask of a dataset, written down (``typing.Protocol``) instead of probed with getattr.

A dataset is always a torch Dataset (map-style or iterable) of {"image", "caption", ...} items; these are the
optional capabilities some of ours have. ``isinstance(ds, CacheableDataset)`` asks one of them by name.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class CacheableDataset(Protocol):
    """Its items can be encoded once into a latent cache (ldm.data.auto_cache): ``cache_spec()`` says how (the
    settings that key the cache, the items, the source to encode, the random transforms the cache must vary)."""

    def cache_spec(self) -> Any: ...


@runtime_checkable
class PairedRows(Protocol):
    """A dataset whose items pair rows of a cached view (DreamBooth: an instance row + a class row):
    ``with_cache(view)`` is the same dataset reading its rows from ``view``."""

    def with_cache(self, view: Any) -> Any: ...


@runtime_checkable
class EpochAware(Protocol):
    """A dataset (or sampler) whose order or random draws depend on the epoch (webdataset shards, a latent cache's
    posterior samples, random flips)."""

    def set_epoch(self, epoch: int) -> None: ...
