"""Fields of the networks' config objects (``UNetConfig``, ``AutoencoderConfig``, ...), with their bounds.

A config dataclass is the one place a network's arguments are written: the network takes it (or its fields as
keywords, which is how Hydra builds it), and the loaders' schemas for configs stored in files
(``ldm.formats.safe_build``) are generated from its fields, types and bounds. The bounds are what a file may ask
for, not what a user may build: they keep a tiny file from describing a network of terabytes."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

BOUNDS = "ldm_bounds"  # the dataclass field metadata key


@dataclasses.dataclass(frozen=True)
class Bounds:
    low: float | None = None  # a number (or every item of a list) is at least this ...
    high: float | None = None  # ... and at most this
    choices: tuple | None = None  # or one of these


def bounded(default: Any, low: float | None = None, high: float | None = None, *,
            choices: tuple | None = None) -> Any:
    """A dataclass field with ``default`` and the bounds a stored config must respect."""
    return dataclasses.field(default=default, metadata={BOUNDS: Bounds(low, high, choices)})


def field_bounds(field: dataclasses.Field) -> Bounds:
    return field.metadata.get(BOUNDS, Bounds())


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type hints of a config dataclass's fields."""
    return typing.get_type_hints(cls)


def config_of(cls: type, args: tuple, arguments: dict[str, Any]) -> Any:
    """A network's config from how it was called: ``Network(config)``, or the config's fields as keywords (Hydra,
    stored configs) and/or positionally in their order (``IdentityAutoencoder(3)``)."""
    if len(args) == 1 and isinstance(args[0], cls):
        if arguments:
            raise TypeError(f"give a {cls.__name__} or its fields as keywords, not both ({sorted(arguments)})")
        return args[0]
    names = [f.name for f in dataclasses.fields(cls)]
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__} has {len(names)} fields, got {len(args)} positional values")
    twice = sorted(set(names[:len(args)]) & set(arguments))
    if twice:
        raise TypeError(f"{cls.__name__}: {twice} given positionally and as keywords")
    return cls(**dict(zip(names, args)), **arguments)


def record(config: Any, omit_none: tuple[str, ...] = ()) -> dict[str, Any]:
    """The plain, JSON-able record of a config (tuples as lists; ``omit_none`` fields left out when None), as
    files store it: ``Network(**record)`` builds the same network."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None and f.name in omit_none:
            continue
        out[f.name] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def split_config(cls: type, args: tuple, arguments: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(``cls`` from ``args`` (a config, or positional field values) or from the keywords that are its fields, the
    other keywords): for a factory whose keywords are two configs (e.g. a tiny CLIP's and its encoder options)."""
    names = {f.name for f in dataclasses.fields(cls)}
    own = {k: v for k, v in arguments.items() if k in names}
    return config_of(cls, args, own), {k: v for k, v in arguments.items() if k not in names}
