"""Textual-inversion embedding files, reader and writer side by side.

Written (safetensors only):
- diffusers ``learned_embeds.safetensors``: ``{placeholder_token: [n, dim]}`` (diffusers
  ``examples/textual_inversion/textual_inversion.py`` ``save_progress``; read by ``load_textual_inversion``);
- A1111 / ComfyUI: ``{"emb_params": [n, dim]}`` in ``<token>.safetensors``, the token being the file stem
  (kohya sd-scripts ``train_textual_inversion.py`` writes it; ComfyUI ``comfy/sd1_clip.py`` ``load_embed`` and
  A1111 ``modules/textual_inversion/textual_inversion.py`` ``create_embedding_from_data`` read it).

Read: those two, A1111's ``string_to_param`` (``{"string_to_param.*": t}`` in a safetensors file), SDXL
``{"clip_l": .., "clip_g": ..}`` (the half whose width fits the text encoder) and a bare single tensor. An A1111
``.pt`` embedding is a pickle: it is read only with ``torch.load(weights_only=True)`` (data, never code) and its
structure is checked. The token of a file is its key (diffusers layout) or its file stem, unless ``FILE:TOKEN``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm.formats.common import save_safetensors
from ldm.formats.safe_build import NodeBudget
from ldm.formats.safe_load import PICKLE_SUFFIXES, CheckpointError, load_pickle

LAYOUTS = ("diffusers", "a1111")
DIFFUSERS_FILE = "learned_embeds.safetensors"  # diffusers' name for the embedding of a run


@dataclass
class EmbeddingFile:
    path: str
    token: str
    vectors: Tensor  # [n, dim], float32
    layout: str  # diffusers | emb_params | string_to_param | clip_l | clip_g | tensor


def save_embedding(path, token: str, vectors: Tensor, layout: str = "diffusers",
                   metadata: dict[str, str] | None = None) -> Path:
    """Write ``vectors`` [n, dim] of ``token`` as ``layout`` (see the module doc)."""
    if layout not in LAYOUTS:
        raise ValueError(f"embedding layout must be one of {LAYOUTS}, got {layout!r}")
    if vectors.ndim != 2:
        raise ValueError(f"embedding vectors must be [n, dim], got shape {tuple(vectors.shape)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: embeddings are written as .safetensors only")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = token if layout == "diffusers" else "emb_params"
    save_safetensors({key: vectors.detach().float().cpu().contiguous()}, path,
                     metadata={"token": token, **(metadata or {})})
    return path


def parse_embedding_spec(spec: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:TOKEN`` -> (file, token or None). A spec that names an existing file is a file."""
    text = str(spec)
    if Path(text).exists():
        return text, None
    head, sep, tail = text.rpartition(":")
    if sep and head and tail:
        return head, tail
    return text, None


MAX_EMBEDDING_DEPTH = 8  # A1111's .pt nests two levels (string_to_param -> "*" -> tensor)


def _flat_tensors(state, path: Path) -> dict[str, Tensor]:
    """A weights-only pickle's nested dicts as ``a.b`` keys; anything but str keys / tensors / plain values is
    refused. A pickle may reference one dict from many places (64 references to a dict of 64 references ... is
    64^8 keys from a few KB): the walk is bounded in depth and in values reached (``NodeBudget``)."""
    out: dict[str, Tensor] = {}
    budget = NodeBudget(str(path), "the embedding file")
    stack = [(state, "", 0)]
    while stack:  # every value is paid for when it is reached, before it is kept
        node, prefix, depth = stack.pop()
        if depth > MAX_EMBEDDING_DEPTH:
            raise CheckpointError(f"{path}: {prefix} is nested more than {MAX_EMBEDDING_DEPTH} levels deep")
        if isinstance(node, Tensor):
            out[prefix or "tensor"] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise CheckpointError(f"{path}: embedding files have string keys, found {type(k).__name__}")
                key = f"{prefix}.{k}" if prefix else k
                budget.spend(key)
                stack.append((v, key, depth + 1))
        elif not isinstance(node, (str, int, float, bool, type(None))):
            raise CheckpointError(f"{path}: unexpected {type(node).__name__} in an embedding file")
    return out


def read_tensors(path: Path) -> dict[str, Tensor]:
    """The file's tensors: safetensors, or a pickle read with ``weights_only=True`` (data only)."""
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - the Rust reader's errors, named with the file
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err
    if suffix in PICKLE_SUFFIXES:
        try:
            state = load_pickle(path)  # weights only, memory-mapped
        except Exception as err:  # noqa: BLE001 - code in the pickle, or not a pickle
            raise CheckpointError(f"{path}: not a data-only embedding file ({type(err).__name__}: {err}); "
                                  "convert it to .safetensors") from err
        return _flat_tensors(state, path)
    raise CheckpointError(f"{path}: unknown embedding file type {suffix!r}; expected .safetensors (or .pt / .bin)")


def _pick(tensors: dict[str, Tensor], path: Path, dim: int | None) -> tuple[str, Tensor, str | None]:
    """(layout, tensor, token named in the file or None)."""
    keys = sorted(tensors)
    stp = [k for k in keys if k == "string_to_param" or k.startswith("string_to_param.")]
    if stp:
        if len(stp) != 1:
            raise CheckpointError(f"{path}: string_to_param holds {len(stp)} embeddings ({stp}); expected one")
        return "string_to_param", tensors[stp[0]], None
    if "emb_params" in tensors:
        return "emb_params", tensors["emb_params"], None
    if {"clip_l", "clip_g"} <= set(tensors):  # SDXL: one half per text encoder; ours take the one that fits
        fits = [k for k in ("clip_l", "clip_g") if dim is None or tensors[k].shape[-1] == dim]
        if not fits:
            raise CheckpointError(f"{path}: SDXL embedding (clip_l {tensors['clip_l'].shape[-1]}, clip_g "
                                  f"{tensors['clip_g'].shape[-1]} dims) fits no {dim}-dim text encoder")
        return fits[0], tensors[fits[0]], None
    if len(tensors) == 1:
        key = keys[0]
        return ("tensor", tensors[key], None) if key == "tensor" else ("diffusers", tensors[key], key)
    raise CheckpointError(f"{path}: unknown embedding layout (keys: {', '.join(keys[:10])}); expected "
                          "{token: [n, dim]} (diffusers), emb_params, string_to_param.* or clip_l/clip_g")


def read_embedding(path, token: str | None = None, dim: int | None = None) -> EmbeddingFile:
    """Read one embedding file; ``token`` overrides the file's; ``dim``: the text encoder's width (checked)."""
    path = Path(path)
    tensors = read_tensors(path)
    layout, vectors, named = _pick(tensors, path, dim)
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] < 1 or not vectors.is_floating_point():
        raise CheckpointError(f"{path}: an embedding is a float tensor [n, dim], got {vectors.dtype} "
                              f"{tuple(vectors.shape)}")
    if dim is not None and vectors.shape[1] != dim:
        raise CheckpointError(f"{path}: embedding vectors have {vectors.shape[1]} dims but the text encoder's "
                              f"have {dim}: it was made for another model")
    if not bool(torch.isfinite(vectors).all()):
        raise CheckpointError(f"{path}: embedding has NaN/inf values")
    return EmbeddingFile(str(path), token or named or path.stem, vectors.float(), layout)


def load_embedding_files(text_encoder, specs, report=print) -> list[EmbeddingFile]:
    """Add each ``FILE[:TOKEN]`` to the text encoder's tokenizer and embedding table (all files read and checked
    first); a prompt then uses the token (multi-vector tokens expand as in diffusers)."""
    from ldm.models.textual_inversion import add_token_rows, placeholder_tokens, token_embedding

    dim = token_embedding(text_encoder).embedding_dim
    files = []
    for spec in specs:
        path, token = parse_embedding_spec(spec)
        files.append(read_embedding(path, token, dim))
    tokens = [f.token for f in files]
    if len(set(tokens)) != len(tokens):
        raise CheckpointError(f"two embedding files use the same token ({tokens}): name one with FILE:TOKEN")
    for f in files:
        try:
            add_token_rows(text_encoder, placeholder_tokens(f.token, f.vectors.shape[0]), f.vectors)
        except ValueError as err:
            raise CheckpointError(f"{f.path}: {err}; load the file under a token of your own: "
                                  f"embeddings=['{f.path}:<{f.token}>']") from err
        report(f"embedding {f.path} ({f.layout}): token {f.token!r}, {f.vectors.shape[0]} vector(s)")
    return files
