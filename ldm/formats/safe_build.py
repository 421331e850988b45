"""The one builder of networks and schedules from configs stored in files (checkpoints, bundles, headers,
``config.json``, manifests).

A file is data: loading it never imports, calls or instantiates anything it names. Stored configs may still
*look* like Hydra nodes (``_target_: ldm.models.unet.UNet``; training checkpoints keep the run's model node), but
``_target_`` is only looked up in :data:`BUILDERS`, a table of our own constructors written here (nothing is
imported by name), and the arguments must be plain values (int, float, bool, str, None, lists of those) under
the parameter names and bounds of :data:`SCHEMAS`. Anything else (``_args_``, ``_partial_``, a nested
``_target_``, an unknown key, a size that would allocate terabytes) is a :class:`CheckpointError` naming the
file and the key, raised before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldm.formats.assets import resolve_weights
from ldm.models.autoencoder import AutoencoderConfig, IdentityConfig
from ldm.models.config_fields import field_bounds, field_types
from ldm.models.text_encoder import CLIPFolder, TextEncoderOptions, TinyCLIPConfig
from ldm.models.text_encoder_sdxl import DualTextOptions, TinyDualCLIPConfig
from ldm.models.controlnet import ControlNetConfig
from ldm.models.flux import FluxConfig
from ldm.models.mmdit import MMDiTConfig
from ldm.models.text_encoder_flux import FluxTextOptions
from ldm.models.text_encoder_sd3 import SD3TextOptions, TinySD3TextConfig
from ldm.models.unet import UNetConfig
from ldm.formats.safe_load import CheckpointError, json_object  # noqa: F401 (json_object: used and re-exported)
from ldm.formats.weight_folder import (cached_hub_folder, check_flux_text_folders, check_text_encoder_folder,
                                      check_text_folders)

MAX_STRING = 4096  # characters of a stored string (paths, hub ids, preset names)
MAX_LIST = 64  # items of a stored list
MAX_DEPTH = 8  # nesting of a stored structure
# Values visited in one stored structure. A pickle or YAML may reference one list from many places: 64 references
# to a list of 64 references ... 8 levels deep is 2.8e14 visits from a few KB, so shared references count each
# time they are reached. Our own run configs hold a few thousand values.
MAX_NODES = 100_000
MAX_STORED_DEPTH = 32  # nesting of a whole stored run config (checkpoints' ``ldm`` entry), Hydra directives and all
MAX_PARAMETERS = 20_000_000_000  # parameters of one network (80 GB in fp32; SDXL's U-Net has 2.6e9)
HEADER_KEY = "ldm_autoencoder_config"  # our VAE file's header entry: the AutoencoderKL constructor arguments


# ----------------------------------------------------------------------------------------------------------------
# plain values


class NodeBudget:
    """How many more values a walk of one stored structure may visit (MAX_NODES): every walker of data a file
    holds spends one per value it reaches."""

    def __init__(self, source: str, key: str, nodes: int = MAX_NODES):
        self.source, self.key, self.left = source, key, nodes

    def spend(self, where: str = "") -> None:
        self.left -= 1
        if self.left < 0:
            raise CheckpointError(f"{self.source}: {self.key} holds more than {MAX_NODES} values (counting shared "
                                  "references each time they are reached; the last one reached: "
                                  f"{where or self.key}); refused as a file built to exhaust us")


def check_plain(value: Any, *, source: str, key: str, depth: int = 0, max_list: int = MAX_LIST,
                budget: NodeBudget | None = None) -> None:
    """``value`` is JSON-like data without Hydra directives: dict keys are strings not starting with ``_`` (no
    ``_target_``, ``_args_``, ``_partial_``, ...), lists and strings are bounded, and at most MAX_NODES values
    are visited."""
    budget = budget or NodeBudget(source, key)
    budget.spend(key)
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{source}: {key} is nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"{source}: {key} = {value!r} is not a finite number")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise CheckpointError(f"{source}: {key} is a string of {len(value)} characters (at most {MAX_STRING})")
        return
    if isinstance(value, (list, tuple)):
        if len(value) > max_list:
            raise CheckpointError(f"{source}: {key} is a list of {len(value)} items (at most {max_list})")
        for i, item in enumerate(value):
            check_plain(item, source=source, key=f"{key}[{i}]", depth=depth + 1, max_list=max_list, budget=budget)
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{source}: {key} has a non-string key {k!r}")
            if k.startswith("_"):
                raise CheckpointError(f"{source}: {key}.{k} is refused: stored configs may not carry Hydra "
                                      "directives (_target_, _args_, _partial_, ...) below a network's own node")
            check_plain(item, source=source, key=f"{key}.{k}", depth=depth + 1, max_list=max_list, budget=budget)
        return
    raise CheckpointError(f"{source}: {key} is a {type(value).__name__}; stored configs hold only plain values")


def check_stored(value: Any, *, source: str, key: str) -> None:
    """A whole stored run config (a training checkpoint's ``ldm`` entry: Hydra nodes with ``_target_`` included)
    is bounded before anything walks it: string keys, plain leaves, at most MAX_STORED_DEPTH levels and MAX_NODES
    values (shared references counted each time). Its nodes are checked one by one when built (``build_node``)."""
    budget = NodeBudget(source, key)
    budget.spend()
    stack = [(value, key, 0)]
    while stack:  # without recursion; every value is paid for when it is reached, before it is kept
        node, where, depth = stack.pop()
        if depth > MAX_STORED_DEPTH:
            raise CheckpointError(f"{source}: {where} is nested more than {MAX_STORED_DEPTH} levels deep")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise CheckpointError(f"{source}: {where} has a non-string key {k!r}")
                budget.spend(f"{where}.{k}")
                stack.append((v, f"{where}.{k}", depth + 1))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                budget.spend(f"{where}[{i}]")
                stack.append((v, f"{where}[{i}]", depth + 1))
        elif not (node is None or isinstance(node, (bool, int, float, str))):
            raise CheckpointError(f"{source}: {where} is a {type(node).__name__}; stored configs hold only plain "
                                  "values")


# ----------------------------------------------------------------------------------------------------------------
# schemas: parameter -> (allowed types, low, high); a bound applies to a number, or to every item of a list


@dataclass(frozen=True)
class Param:
    types: tuple[type, ...]
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    list_of: bool = False  # a list (of ``types`` items)
    or_list: bool = False  # one value, or a list of them (a per-level setting)


INT, FLOAT, BOOL, STR = (int,), (int, float), (bool,), (str,)
OPT_FLOAT = (int, float, type(None))
OPT_STR = (str, type(None))


def schema_of(config_cls: type) -> dict[str, Param]:
    """The schema of a network's config object (``UNetConfig``, ...): every field, its type and its bounds, read
    from the dataclass (the one place they are written; ldm.models.config_fields)."""
    hints = field_types(config_cls)
    return {f.name: _param(hints[f.name], field_bounds(f), config_cls, f.name) for f in dataclasses.fields(config_cls)}


_SCALARS = {int: INT, float: FLOAT, bool: BOOL, str: STR}


def _param(hint: Any, bounds: Any, config_cls: type, name: str) -> Param:
    """int / float / bool / str, ``X | None``, ``tuple[X, ...]`` (a list) and ``X | tuple[X, ...]`` (one or a
    list) -> a Param."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    optional = type(None) in args
    lists = [a for a in args if typing.get_origin(a) is tuple]
    scalars = [a for a in args if a in _SCALARS]
    item = typing.get_args(lists[0])[0] if lists else (scalars[0] if scalars else None)
    if item not in _SCALARS:
        raise TypeError(f"{config_cls.__name__}.{name}: no stored form for {hint!r}")
    allowed = _SCALARS[item] + ((type(None),) if optional else ())
    return Param(allowed, bounds.low, bounds.high, bounds.choices, list_of=bool(lists) and not scalars,
                 or_list=bool(lists) and bool(scalars))


UNET_SCHEMA = schema_of(UNetConfig)
CONTROLNET_SCHEMA = schema_of(ControlNetConfig)
AUTOENCODER_SCHEMA = schema_of(AutoencoderConfig)
IDENTITY_SCHEMA = schema_of(IdentityConfig)
SCHEDULE_SCHEMA = {
    "kind": Param(STR), "num_train_timesteps": Param(INT, 2, 100_000), "beta_start": Param(OPT_FLOAT, 0.0, 1.0),
    "beta_end": Param(OPT_FLOAT, 0.0, 1.0), "rescale_zero_terminal_snr": Param(BOOL),
    "prediction_type": Param(STR, choices=("epsilon", "v_prediction", "sample")),
}
# SD3's MMDiT and its tiny text encoder (model=mmdit_tiny)
MMDIT_SCHEMA = schema_of(MMDiTConfig)
FLUX_SCHEMA = schema_of(FluxConfig)  # Flux.1 (model=flux_tiny, the flux_dev / flux_schnell presets)
TINY_SD3_TEXT_SCHEMA = {**schema_of(TinySD3TextConfig), **schema_of(SD3TextOptions)}
PRETRAINED_SD3_TEXT_SCHEMA = {"path_or_hub_id": schema_of(CLIPFolder)["path_or_hub_id"], "use_t5": Param(BOOL),
                              **schema_of(SD3TextOptions)}
PRETRAINED_FLUX_TEXT_SCHEMA = {"path_or_hub_id": schema_of(CLIPFolder)["path_or_hub_id"], "use_t5": Param(BOOL),
                               **schema_of(FluxTextOptions)}  # FLUX.1's CLIP-L + T5 (model=flux_dev)
# ldm.diffusion.flow.FlowMatching (schedule=flow): flow matching's shift and loss weighting
FLOW_SCHEDULE_SCHEMA = {
    "num_train_timesteps": Param(INT, 2, 100_000), "shift": Param(FLOAT, 1e-3, 1e3),
    "dynamic_shift": Param(BOOL), "base_shift": Param(FLOAT, -100.0, 100.0), "max_shift": Param(FLOAT, -100.0, 100.0),
    "base_seq_len": Param(INT, 1, 10**8), "max_seq_len": Param(INT, 2, 10**8), "patch_size": Param(INT, 1, 64),
    "weighting": Param(STR, choices=("none", "sigma_sqrt", "cosmap")), "prediction_type": Param(STR, choices=("flow",)),
    "spacing": Param(STR, choices=("table", "flux")),
}
# The text encoders' factories (a stored model.text_encoder node): their sources and options, from their configs
TEXT_OPTIONS_SCHEMA = schema_of(TextEncoderOptions)
TINY_TEXT_SCHEMA = {**schema_of(TinyCLIPConfig), "subfolder_layout": Param(BOOL), **TEXT_OPTIONS_SCHEMA}
PRETRAINED_TEXT_SCHEMA = {**schema_of(CLIPFolder), **TEXT_OPTIONS_SCHEMA}
# SDXL's dual encoder (ldm.models.text_encoder_sdxl.DualCLIPTextEncoder)
PRETRAINED_DUAL_TEXT_SCHEMA = {"path_or_hub_id": schema_of(CLIPFolder)["path_or_hub_id"],
                               **schema_of(DualTextOptions)}
TINY_DUAL_TEXT_SCHEMA = {**schema_of(TinyDualCLIPConfig), **schema_of(DualTextOptions)}
# The first-stage factory of our Hydra configs: a preset (+ overrides), optionally a weights file of our own
FACTORY_AUTOENCODER_SCHEMA = {"preset": Param(OPT_STR), "weights": Param(OPT_STR), "pixel_space": Param(BOOL),
                              **AUTOENCODER_SCHEMA}


def check_kwargs(kwargs: dict, schema: dict[str, Param], *, source: str, key: str) -> dict:
    """Plain, known, bounded constructor arguments (a copy), or a CheckpointError naming ``source`` and the key."""
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{source}: {key} must be a mapping of arguments, got {type(kwargs).__name__}")
    check_plain(kwargs, source=source, key=key)
    out = {}
    for name, value in kwargs.items():
        where = f"{key}.{name}"
        param = schema.get(name)
        if param is None:
            raise CheckpointError(f"{source}: unknown key {where}; allowed: {', '.join(sorted(schema))}")
        is_list = isinstance(value, (list, tuple))
        items = value if is_list and (param.list_of or param.or_list) else [value]
        if param.list_of and not is_list:
            raise CheckpointError(f"{source}: {where} must be a list, got {value!r}")
        for item in items:
            _check_value(item, param, source=source, where=where)
        out[name] = list(value) if is_list and (param.list_of or param.or_list) else value
    return out


def _check_value(value: Any, param: Param, *, source: str, where: str) -> None:
    ok = isinstance(value, param.types) and not (isinstance(value, bool) and bool not in param.types)
    if not ok:
        names = " or ".join("None" if t is type(None) else t.__name__ for t in param.types)
        raise CheckpointError(f"{source}: {where} = {value!r} must be {names}")
    if param.choices is not None and value not in param.choices:
        raise CheckpointError(f"{source}: {where} = {value!r} is not one of {list(param.choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (param.low is not None and value < param.low) or (param.high is not None and value > param.high):
            raise CheckpointError(f"{source}: {where} = {value!r} is outside [{param.low}, {param.high}]")


# ----------------------------------------------------------------------------------------------------------------
# builders: every name a stored config may use, mapped to our own constructor


def _unet(**kw) -> nn.Module:
    from ldm.models.unet import UNet

    return UNet(**kw)


def _unet_preset(name: str, **kw) -> nn.Module:
    from ldm.models.unet import UNet

    return UNet.from_preset(name, **kw)


def _controlnet(**kw) -> nn.Module:
    from ldm.models.controlnet import ControlNet

    return ControlNet(**kw)


def _autoencoder(**kw) -> nn.Module:
    from ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(**kw)


def _identity(**kw) -> nn.Module:
    from ldm.models.autoencoder import IdentityAutoencoder

    return IdentityAutoencoder(**kw)


def _factory_autoencoder(preset: str | None = "sd", weights: str | None = None, pixel_space: bool = False,
                         *, source: str = "", **overrides) -> nn.Module:
    """Our config's first stage, architecture only (the weights come with the file being loaded): the config
    stored in ``weights``' header when that file is here (read as JSON, checked like any stored config), else
    the preset."""
    from ldm.models.autoencoder import AutoencoderKL

    if pixel_space:
        return _identity(**{k: v for k, v in overrides.items() if k in IDENTITY_SCHEMA})
    stored = _weights_header_config(weights)
    if stored is not None:
        return _autoencoder(**{**stored, **overrides})
    if preset is None:
        raise CheckpointError(f"{source}: model.autoencoder has neither a preset nor a readable weights file")
    return AutoencoderKL.from_preset(preset, **overrides)


def _weights_header_config(weights: str | None) -> dict | None:
    if not weights:
        return None
    try:
        return stored_autoencoder_config(resolve_weights(weights))
    except FileNotFoundError:  # not on this machine: the preset (the weights come with the file being loaded)
        return None


def stored_autoencoder_config(path: Path) -> dict | None:
    """The checked config in the header of our VAE file, or None (not a safetensors file, or no such header)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable header: fall back to the preset
        return None
    if HEADER_KEY not in meta:
        return None
    config = json_object(meta[HEADER_KEY], source=str(path), key=HEADER_KEY)
    return check_kwargs(config, AUTOENCODER_SCHEMA, source=str(path), key=HEADER_KEY)


def _tiny_text_encoder(preset: str = "tiny", folder: str | None = None, **kw) -> nn.Module:
    """The local tiny CLIP: a stored ``folder`` is used only if it already holds one (a file never makes us write
    into a folder it names); otherwise it is written afresh (same seed and words -> same weights)."""
    from ldm.models.text_encoder import CLIPTextEncoder

    if folder is not None and not (Path(folder) / "text_encoder" / "model.safetensors").is_file():
        folder = None
    if folder is not None:  # a folder on this machine that a file names: checked like any text encoder folder
        check_text_encoder_folder(Path(folder) / "text_encoder")
    return CLIPTextEncoder.from_tiny(preset, folder=folder, **kw)


_TEXT_PATTERNS = ["tokenizer*/*", "text_encoder*/*.json", "text_encoder*/*.safetensors"]


def _local_text_folder(path_or_hub_id: str, source: str) -> Path:
    """The folder a stored text encoder node names: a local folder, or a hub id already in this machine's cache."""
    if Path(path_or_hub_id).is_dir():
        return Path(path_or_hub_id)
    return cached_hub_folder(path_or_hub_id, _TEXT_PATTERNS, source=source, key="text_encoder.path_or_hub_id")


def _pretrained_text_encoder(path_or_hub_id: str, *, source: str = "", **kw) -> nn.Module:
    from ldm.models.text_encoder import CLIPTextEncoder

    folder = _local_text_folder(path_or_hub_id, source)  # its weights checked against its config first
    check_text_encoder_folder(folder / ("text_encoder" if kw.get("subfolder_layout", True) else ""))
    return CLIPTextEncoder.from_pretrained(folder, **kw)


def _pretrained_dual_text_encoder(path_or_hub_id: str, *, source: str = "", **kw) -> nn.Module:
    from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder

    folder = _local_text_folder(path_or_hub_id, source)
    for sub in ("text_encoder", "text_encoder_2"):
        check_text_encoder_folder(folder / sub, projection=sub == "text_encoder_2")
    return DualCLIPTextEncoder.from_pretrained(folder, **kw)


def _pretrained_flux_text_encoder(path_or_hub_id: str, *, source: str = "", use_t5: bool = True, **kw) -> nn.Module:
    """FLUX.1's CLIP-L (+ T5) of a diffusers FLUX.1 folder, each checked against its weights before transformers
    allocates it (a hub id only from this machine's cache)."""
    from ldm.models.text_encoder_flux import FluxTextEncoder

    folder = _local_text_folder(path_or_hub_id, source)
    return FluxTextEncoder.from_pretrained(folder, use_t5=check_flux_text_folders(folder, use_t5), **kw)


def _pretrained_sd3_text_encoder(path_or_hub_id: str, *, source: str = "", use_t5: bool = True, **kw) -> nn.Module:
    """SD3's CLIP-L + CLIP-G (+ T5) of a diffusers SD3 folder, each checked against its weights before transformers
    allocates it (a hub id only from this machine's cache)."""
    from ldm.models.text_encoder_sd3 import SD3TextEncoder

    folder = _local_text_folder(path_or_hub_id, source)
    return SD3TextEncoder.from_pretrained(folder, use_t5=check_text_folders(folder, use_t5), **kw)


def _tiny_dual_text_encoder(folder: str | None = None, **kw) -> nn.Module:
    """The local tiny SDXL-like pair; a stored ``folder`` is used only if it already holds one (as for the tiny
    CLIP: a file never makes us write into a folder it names)."""
    from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder

    if folder is not None and not (Path(folder) / "text_encoder_2" / "model.safetensors").is_file():
        folder = None
    for sub in ("text_encoder", "text_encoder_2") if folder is not None else ():
        check_text_encoder_folder(Path(folder) / sub, projection=sub == "text_encoder_2")
    return DualCLIPTextEncoder.from_tiny(folder=folder, **kw)


def _schedule(**kw):
    from ldm.diffusion.schedules import NoiseSchedule

    return NoiseSchedule.make(**kw)


def _mmdit(**kw) -> nn.Module:
    from ldm.models.mmdit import MMDiT

    return MMDiT(**kw)


def _mmdit_preset(name: str, **kw) -> nn.Module:
    from ldm.models.mmdit import MMDiT

    return MMDiT.from_preset(name, **kw)


def _flux(**kw) -> nn.Module:
    from ldm.models.flux import Flux

    return Flux(**kw)


def _flux_preset(name: str, **kw) -> nn.Module:
    from ldm.models.flux import Flux

    return Flux.from_preset(name, **kw)


def _tiny_sd3_text_encoder(folder: str | None = None, **kw) -> nn.Module:
    """The local tiny SD3 CLIP pair; a stored ``folder`` only if it already holds one (as the other tiny encoders)."""
    from ldm.models.text_encoder_sd3 import SD3TextEncoder

    if folder is not None and not (Path(folder) / "text_encoder_2" / "model.safetensors").is_file():
        folder = None
    for sub in ("text_encoder", "text_encoder_2") if folder is not None else ():
        check_text_encoder_folder(Path(folder) / sub, projection=True)
    return SD3TextEncoder.from_tiny(folder=folder, **kw)


def _flow_schedule(**kw):
    from ldm.diffusion.flow import FlowMatching

    return FlowMatching(**kw)


@dataclass(frozen=True)
class Builder:
    build: Callable[..., Any]
    schema: dict[str, Param]
    role: str  # "unet", "autoencoder", "text_encoder", "schedule"
    needs_source: bool = False


UNET_PRESET_SCHEMA = {"name": Param(STR), **UNET_SCHEMA}
UNET_TARGET = "ldm.models.unet.UNet"
CONTROLNET_TARGET = "ldm.models.controlnet.ControlNet"
AUTOENCODER_TARGET, IDENTITY_TARGET = "ldm.models.autoencoder.AutoencoderKL", "ldm.models.autoencoder.IdentityAutoencoder"
SCHEDULE_TARGET = "ldm.diffusion.schedules.NoiseSchedule.make"
FLOW_SCHEDULE_TARGET = "ldm.diffusion.flow.FlowMatching"
FACTORY_AUTOENCODER_TARGET = "ldm.training.build.factories.autoencoder"
_FACTORY_AUTOENCODER = Builder(_factory_autoencoder, FACTORY_AUTOENCODER_SCHEMA, "autoencoder", needs_source=True)
# Every _target_ a stored config may name (the Hydra paths our configs and exports write) -> our constructor.
BUILDERS: dict[str, Builder] = {
    UNET_TARGET: Builder(_unet, UNET_SCHEMA, "unet"),
    "ldm.models.unet.UNet.from_preset": Builder(_unet_preset, UNET_PRESET_SCHEMA, "unet"),
    CONTROLNET_TARGET: Builder(_controlnet, CONTROLNET_SCHEMA, "controlnet"),
    AUTOENCODER_TARGET: Builder(_autoencoder, AUTOENCODER_SCHEMA, "autoencoder"),
    IDENTITY_TARGET: Builder(_identity, IDENTITY_SCHEMA, "autoencoder"),
    FACTORY_AUTOENCODER_TARGET: _FACTORY_AUTOENCODER,
    # the name checkpoints written before ldm/training/ moved into wings store (a name looked up here, never imported)
    "ldm.training.factories.autoencoder": _FACTORY_AUTOENCODER,
    "ldm.models.text_encoder.CLIPTextEncoder.from_tiny": Builder(_tiny_text_encoder, TINY_TEXT_SCHEMA,
                                                                 "text_encoder"),
    "ldm.models.text_encoder.CLIPTextEncoder.from_pretrained": Builder(
        _pretrained_text_encoder, PRETRAINED_TEXT_SCHEMA, "text_encoder", needs_source=True),
    "ldm.models.text_encoder_sdxl.DualCLIPTextEncoder.from_pretrained": Builder(
        _pretrained_dual_text_encoder, PRETRAINED_DUAL_TEXT_SCHEMA, "text_encoder", needs_source=True),
    "ldm.models.text_encoder_sdxl.DualCLIPTextEncoder.from_tiny": Builder(
        _tiny_dual_text_encoder, TINY_DUAL_TEXT_SCHEMA, "text_encoder"),
    SCHEDULE_TARGET: Builder(_schedule, SCHEDULE_SCHEMA, "schedule"),
    "ldm.models.mmdit.MMDiT": Builder(_mmdit, MMDIT_SCHEMA, "unet"),
    "ldm.models.mmdit.MMDiT.from_preset": Builder(_mmdit_preset, {"name": Param(STR), **MMDIT_SCHEMA}, "unet"),
    "ldm.models.flux.Flux": Builder(_flux, FLUX_SCHEMA, "unet"),
    "ldm.models.flux.Flux.from_preset": Builder(_flux_preset, {"name": Param(STR), **FLUX_SCHEMA}, "unet"),
    "ldm.models.text_encoder_sd3.SD3TextEncoder.from_tiny": Builder(_tiny_sd3_text_encoder, TINY_SD3_TEXT_SCHEMA,
                                                                     "text_encoder"),
    "ldm.models.text_encoder_sd3.SD3TextEncoder.from_pretrained": Builder(
        _pretrained_sd3_text_encoder, PRETRAINED_SD3_TEXT_SCHEMA, "text_encoder", needs_source=True),
    "ldm.models.text_encoder_flux.FluxTextEncoder.from_pretrained": Builder(
        _pretrained_flux_text_encoder, PRETRAINED_FLUX_TEXT_SCHEMA, "text_encoder", needs_source=True),
    FLOW_SCHEDULE_TARGET: Builder(_flow_schedule, FLOW_SCHEDULE_SCHEMA, "schedule"),
}


def _on_meta(build: Callable[[], nn.Module]) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def build_node(node: Any, role: str, *, source: str, key: str, meta: bool = False):
    """Build one stored node ``{"_target_": <a name in BUILDERS>, **plain arguments}`` for ``role``.

    Nothing is built unless every key is known, plain and within bounds, and a network's parameter count (counted
    on the meta device first) is at most MAX_PARAMETERS. meta: leave a network on the meta device (to be filled
    with ``load_state_dict(assign=True)``)."""
    if not isinstance(node, dict):
        raise CheckpointError(f"{source}: {key} must be a config node, got {type(node).__name__}")
    target = node.get("_target_")
    builder = BUILDERS.get(target) if isinstance(target, str) else None
    if builder is None or builder.role != role:
        allowed = sorted(n for n, b in BUILDERS.items() if b.role == role)
        raise CheckpointError(f"{source}: {key}._target_ = {target!r} is refused; a stored {role} may only be one "
                              f"of {allowed} (nothing a file names is imported)")
    kwargs = check_kwargs({k: v for k, v in node.items() if k != "_target_"}, builder.schema, source=source, key=key)
    return build_checked(builder, kwargs, source=source, key=key, meta=meta)


def build_network(role: str, config: dict, *, source: str, key: str, meta: bool = False) -> nn.Module:
    """A U-Net, ControlNet or AutoencoderKL from its constructor arguments as stored in a file (``UNet(**config)``)."""
    builder = BUILDERS[{"unet": UNET_TARGET, "controlnet": CONTROLNET_TARGET, "autoencoder": AUTOENCODER_TARGET}[role]]
    kwargs = check_kwargs(config, builder.schema, source=source, key=key)
    return build_checked(builder, kwargs, source=source, key=key, meta=meta)


def build_checked(builder: Builder, kwargs: dict, *, source: str, key: str, meta: bool = False):
    extra = {"source": source} if builder.needs_source else {}
    try:
        if builder.role in ("unet", "controlnet", "autoencoder"):
            count = _on_meta(lambda: builder.build(**kwargs, **extra))
            if count > MAX_PARAMETERS:
                raise CheckpointError(f"{source}: {key} describes a {builder.role} of {count:.3g} parameters "
                                      f"(at most {MAX_PARAMETERS:.3g}); refused")
            if meta:
                with torch.device("meta"):
                    return builder.build(**kwargs, **extra)
        return builder.build(**kwargs, **extra)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{source}: cannot build {key} from {kwargs} ({type(err).__name__}: {err})") from err
