"""Safe checkpoint reading and all-or-nothing loading into modules.

Pickled files (``.ckpt/.pt/.pth/.bin``) are only read with
``torch.load(weights_only=True)``: arbitrary pickled objects are refused. Zip-format pickles are memory-mapped
(``mmap=True``): a storage is pages of the file (torch checks every stated storage size against its record), read
when copied, not a second copy in memory. JSON a file holds is bounded (bytes and nesting). A module built on the
meta device gets its memory only once a state dict that fills all of it has been checked against it.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_LISTED = 20
MAX_JSON_BYTES = 64 << 20  # a JSON file we read (configs, weight indexes: the largest known is a few hundred KB)
MAX_JSON_DEPTH = 64  # nesting of stored JSON (configs nest a few levels; deeper is a file built to exhaust us)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the module."""


def load_state_dict(path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or pickled (weights-only) checkpoint onto the CPU.

    A Lightning-style top-level ``"state_dict"`` is unwrapped; non-tensor
    top-level entries (epoch, global_step, ...) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        state = _read_pickle(path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors, .ckpt, .pt, .pth or .bin"
        )
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError, ... from the Rust reader
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err


def load_pickle(path: Path):
    """``torch.load(weights_only=True)``, memory-mapped for zip-format files (torch >= 1.6; the legacy format cannot
    be mapped and is read as it is: torch checks each storage against the bytes it reads)."""
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def _read_pickle(path: Path):
    import pickle

    try:
        return load_pickle(path)
    except pickle.UnpicklingError as err:
        detail = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if detail:
            raise CheckpointError(
                f"{path}: refused to unpickle non-tensor object {detail.group(1)} (weights_only=True); "
                "convert the file to .safetensors with a trusted tool"
            ) from err
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (not a weights-only pickle)") from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}: {err})") from err


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {len(items)} {title}:"]
    lines += [f"    {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"    ... and {len(items) - MAX_LISTED} more")
    return lines


def check_state_dict(module: nn.Module, state_dict: dict):
    """Return ``(missing, unexpected, misshaped)`` key lists (descriptions for the last)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, misshaped


def mismatch_report(module: nn.Module, state_dict: dict, *, strict: bool = True, name: str = "") -> str | None:
    """Describe why ``state_dict`` does not fit ``module``, or ``None`` if it fits."""
    missing, unexpected, misshaped = check_state_dict(module, state_dict)
    if not strict:
        missing, unexpected = [], []
    if not (missing or unexpected or misshaped):
        return None
    lines = [f"{name or type(module).__name__}:"]
    lines += _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
    lines += _listing("mis-shaped keys", misshaped)
    return "\n".join(lines)


def load_into(module: nn.Module, state_dict: dict, *, source: str, strict: bool = True):
    """Copy ``state_dict`` into ``module`` only if every key fits.

    Missing, unexpected and mis-shaped keys are reported together in one
    ``CheckpointError`` naming ``source``; nothing is copied in that case.
    With ``strict=False`` only mis-shaped keys are errors. Returns
    ``(missing, unexpected)``.
    """
    report = mismatch_report(module, state_dict, strict=strict)
    if report:
        raise CheckpointError(f"cannot load {source}\n{report}")
    missing, unexpected, _ = check_state_dict(module, state_dict)
    copy_checked(module, state_dict, source=source)
    return missing, unexpected


def copy_checked(module: nn.Module, state_dict: dict, *, source: str) -> None:
    """Copy an already checked ``state_dict`` into ``module``. A module built on the meta device (its sizes came
    from a stored config, not yet backed by the file) gets CPU memory here, for its meta tensors only, and only
    when ``state_dict`` holds a value for every one of them: nothing is allocated that the file does not hold."""
    on_meta = [k for k, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    unfilled = [k for k in on_meta if k not in state_dict]
    if unfilled:
        raise CheckpointError(f"cannot load {source}: it holds no values for {len(unfilled)} tensors of the model, "
                              f"e.g. {', '.join(unfilled[:5])}")
    if on_meta:
        module._apply(lambda t: torch.empty_like(t, device="cpu") if t.is_meta else t)
        left = [n for n, b in module.named_buffers() if b.is_meta]  # non-persistent buffers: no file value exists
        if left:
            raise CheckpointError(f"cannot load {source}: {left[:5]} are not stored in files; build the model on "
                                  "a real device")
    module.load_state_dict(state_dict, strict=False)


# ----------------------------------------------------------------------------------------------------------------
# JSON a file holds


def json_value(text: str | bytes, *, source: str, key: str) -> Any:
    """Any JSON value a file holds (a metadata row, a sample's sidecar), or a CheckpointError naming it: invalid,
    nested deeper than MAX_JSON_DEPTH (a RecursionError otherwise), or a number Python refuses to parse."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{source}: {key} is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (TypeError, ValueError) as err:  # JSONDecodeError, an integer of more than 4300 digits
        raise CheckpointError(f"{source}: {key} is not valid JSON ({err})") from err
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{source}: {key} is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def json_object(text: str | bytes, *, source: str, key: str) -> dict:
    """A JSON object stored in a header / file (see :func:`json_value`), or a CheckpointError naming it."""
    value = json_value(text, source=source, key=key)
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: {key} must be a JSON object, got {type(value).__name__}")
    return value


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (JSON has no shared references: linear in its size)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def read_json_file(path: str | Path, *, key: str | None = None) -> dict:
    """A JSON object file (a config, a weight index), at most MAX_JSON_BYTES, checked as :func:`json_object`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: a JSON file of {size} bytes (at most {MAX_JSON_BYTES}); refused")
        text = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read JSON config ({err})") from err
    return json_object(text, source=str(path), key=key or path.name)


# ----------------------------------------------------------------------------------------------------------------
# shapes without loading


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a weight file, read without loading its tensors (the safetensors header; a pickle
    memory-mapped), to check a model built on the meta device against the file before allocating it."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - the Rust reader's errors, named with the file
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err
    return {k: tuple(v.shape) for k, v in load_state_dict(path).items()}
