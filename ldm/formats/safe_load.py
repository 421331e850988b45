"""Safe checkpoint reading and all-or-nothing loading into modules.

Pickled files (``.ckpt/.pt/.pth/.bin``) are only read with
``torch.load(weights_only=True)``: arbitrary pickled objects are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_LISTED = 20


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


def _read_pickle(path: Path):
    import pickle

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
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
    module.load_state_dict(state_dict, strict=False)
    return missing, unexpected
