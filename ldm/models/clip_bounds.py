"""Bounds of a transformers CLIP text model (and of SD3's T5 encoder) read from a folder or hub id, checked before
transformers allocates it.

A ``config.json`` is data: each size field is bounded, and the model it describes is built on the meta device and
counted before anything real is allocated (bounded fields still multiply: a vocabulary of 10^6 by a width of
16384 is 65 GB). ``ldm.formats`` also compares that meta model with the tensors the folder's weight file
holds; here, below the formats, the text encoders' ``from_pretrained`` apply the bounds to every folder and hub id.
Errors are ``ValueError``s naming the file and the field (``ldm.formats`` raises them as ``CheckpointError``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# transformers CLIPTextConfig fields that size the model
CLIP_TEXT_BOUNDS = {"vocab_size": 1_000_000, "hidden_size": 16384, "intermediate_size": 65536,
                    "num_hidden_layers": 128, "num_attention_heads": 1024, "max_position_embeddings": 65536,
                    "projection_dim": 16384}
MAX_TEXT_PARAMETERS = 2_000_000_000  # OpenCLIP bigG's text tower (SDXL's text_encoder_2) has 0.7e9
MAX_CONFIG_BYTES = 16 << 20  # a CLIP config.json is about 1 KB
CODE_KEYS = ("auto_map", "custom_pipelines", "_target_", "_args_", "_partial_")  # names of code to import or call


def check_clip_text_fields(config: dict, *, source: str) -> None:
    """The size fields of a CLIPTextConfig dict are integers within CLIP_TEXT_BOUNDS; no key names code."""
    _check_fields(config, CLIP_TEXT_BOUNDS, source=source)


def _check_fields(config: dict, bounds: dict[str, int], *, source: str) -> None:
    """Each of ``bounds``' fields present in ``config`` is an integer in [1, bound]; no key of CODE_KEYS."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: not a JSON object")
    for name, high in bounds.items():
        value = config.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= high):
            raise ValueError(f"{source}: {name} = {value!r} must be an integer in [1, {high}]")
    for name in CODE_KEYS:
        if name in config:
            raise ValueError(f"{source}: {name} names code to import or call; refused")


def meta_text_model(model_class: type[nn.Module], config, *, source: str) -> nn.Module:
    """``model_class(config)`` on the meta device (no memory), refused above MAX_TEXT_PARAMETERS."""
    return _meta_counted(model_class, config, MAX_TEXT_PARAMETERS, "text encoder", source=source)


def _meta_counted(model_class: type[nn.Module], config, most: int, what: str, *, source: str) -> nn.Module:
    """``model_class(config)`` on the meta device (no memory), refused above ``most`` parameters."""
    with torch.device("meta"):
        model = model_class(config)
    count = sum(p.numel() for p in model.parameters())
    if count > most:
        raise ValueError(f"{source}: describes a {what} of {count:.3g} parameters (at most {most:.3g}); refused")
    return model


def bounded_text_config(path_or_hub_id, subfolder: str, model_class: type[nn.Module]):
    """The ``CLIPTextConfig`` of ``path_or_hub_id/subfolder``, its fields bounded and the model it describes
    counted on the meta device; pass it to ``model_class.from_pretrained(..., config=...)``."""
    local = Path(str(path_or_hub_id)) / subfolder / "config.json"
    source = str(local) if local.is_file() else f"{path_or_hub_id} ({subfolder or '.'}/config.json)"
    if local.is_file() and local.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{source}: a config of {local.stat().st_size} bytes (at most {MAX_CONFIG_BYTES}); refused")
    try:
        config = model_class.config_class.from_pretrained(str(path_or_hub_id), subfolder=subfolder)
    except RecursionError:  # json.loads of a deeply nested file
        raise ValueError(f"{source}: nested too deeply to be a text encoder config") from None
    check_clip_text_fields(config.to_dict(), source=source)
    meta_text_model(model_class, config, source=source)
    return config


# transformers T5Config fields that size a T5 encoder (SD3's T5-XXL: 32128 x 4096, d_ff 10240, 24 x 64 heads of 64)
T5_BOUNDS = {"vocab_size": 1_000_000, "d_model": 16384, "d_kv": 1024, "d_ff": 65536, "num_layers": 128,
             "num_heads": 1024, "relative_attention_num_buckets": 4096, "relative_attention_max_distance": 65536}
MAX_T5_PARAMETERS = 12_000_000_000  # T5-XXL's encoder (SD3's text_encoder_3/) has 4.8e9


def check_t5_fields(config: dict, *, source: str) -> None:
    """The size fields of a T5Config dict are integers within T5_BOUNDS; no key names code."""
    _check_fields(config, T5_BOUNDS, source=source)


def meta_t5_encoder(config, *, source: str) -> nn.Module:
    """``T5EncoderModel(config)`` on the meta device (no memory), refused above MAX_T5_PARAMETERS."""
    from transformers import T5EncoderModel

    return _meta_counted(T5EncoderModel, config, MAX_T5_PARAMETERS, "T5 encoder", source=source)


def bounded_t5_config(path_or_hub_id, subfolder: str):
    """The ``T5Config`` of ``path_or_hub_id/subfolder`` (SD3's ``text_encoder_3``), its fields bounded and the encoder
    it describes counted on the meta device; pass it to ``T5EncoderModel.from_pretrained(..., config=...)``."""
    from transformers import T5Config

    local = Path(str(path_or_hub_id)) / subfolder / "config.json"
    source = str(local) if local.is_file() else f"{path_or_hub_id} ({subfolder}/config.json)"
    if local.is_file() and local.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{source}: a config of {local.stat().st_size} bytes (at most {MAX_CONFIG_BYTES}); refused")
    try:
        config = T5Config.from_pretrained(str(path_or_hub_id), subfolder=subfolder)
    except RecursionError:
        raise ValueError(f"{source}: nested too deeply to be a text encoder config") from None
    check_t5_fields(config.to_dict(), source=source)
    meta_t5_encoder(config, source=source)
    return config
