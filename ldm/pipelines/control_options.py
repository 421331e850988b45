"""sample.py's ControlNet options: ``controlnet=<folder or file> control_image=<png> control_scale=0.8
control_start=0 control_end=1``, one value or a list (one per ControlNet; a single scale / start / end applies to
all). Checked before the model loads; the ControlNets are read with ``ldm.formats.controlnet_file`` (bounded) and
must fit the model's U-Net."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.pipelines.controlnet import Control

# the U-Net settings a ControlNet's residuals must match (the skip connections they are added to)
MATCHING = ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels")


class ControlOptionError(ValueError):
    """A ControlNet option is wrong; the message names it."""


@dataclass
class ControlSpec:
    path: str
    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    return list(value)


def control_specs(controlnet: Any, control_image: Any, control_scale: Any, control_start: Any,
                  control_end: Any) -> list[ControlSpec]:
    """The options as one spec per ControlNet (checked: counts, files, numbers)."""
    nets, images = [str(p) for p in _as_list(controlnet)], [str(p) for p in _as_list(control_image)]
    if len(nets) != len(images):
        raise ControlOptionError(f"controlnet names {len(nets)} ControlNet(s) and control_image {len(images)} "
                                 "image(s): give one control image per ControlNet")
    per_net = {}
    for name, value, default in (("control_scale", control_scale, 1.0), ("control_start", control_start, 0.0),
                                 ("control_end", control_end, 1.0)):
        values = [float(v) for v in _as_list(value)] or [default]
        if len(values) == 1:
            values = values * len(nets)
        if len(values) != len(nets):
            raise ControlOptionError(f"{name} has {len(values)} values for {len(nets)} ControlNets (give one, or "
                                     "one per ControlNet)")
        per_net[name] = values
    specs = []
    for i, (net, image) in enumerate(zip(nets, images)):
        if not Path(net).exists():
            raise FileNotFoundError(f"controlnet: not found: {net} (a diffusers ControlNet folder or a "
                                    "control_model.* .safetensors file)")
        if not Path(image).is_file():
            raise FileNotFoundError(f"control_image: file not found: {image}")
        spec = ControlSpec(net, image, per_net["control_scale"][i], per_net["control_start"][i],
                           per_net["control_end"][i])
        if not 0.0 <= spec.start < spec.end <= 1.0:
            raise ControlOptionError(f"control_start / control_end of ControlNet {i}: need 0 <= start < end <= 1, "
                                     f"got {spec.start}, {spec.end}")
        specs.append(spec)
    return specs


@dataclass
class LoadedControl:
    spec: ControlSpec
    net: torch.nn.Module
    image: Any  # PIL image


def load_controls(specs: list[ControlSpec], bundle, open_image) -> list[LoadedControl]:
    """Each ControlNet read (bounded), checked against the model's U-Net, on its device and dtype."""
    from ldm.formats.controlnet_file import read_controlnet

    unet = bundle.unet
    param = next(unet.parameters())
    out = []
    for spec in specs:
        net = read_controlnet(spec.path, unet.config)
        differ = [k for k in MATCHING if net.config.get(k) != unet.config.get(k)]
        if differ:
            raise ControlOptionError(f"controlnet {spec.path} does not fit this model's U-Net: "
                                     + ", ".join(f"{k} {net.config.get(k)} vs {unet.config.get(k)}" for k in differ))
        if net.hint_factor != bundle.downsample_factor:
            raise ControlOptionError(f"controlnet {spec.path}: its hint encoder downsamples by {net.hint_factor}, "
                                     f"this model's VAE by {bundle.downsample_factor}")
        out.append(LoadedControl(spec, net.to(param.device, param.dtype).eval(), open_image(Path(spec.image))))
    return out


def controls_at(loaded: list[LoadedControl], height: int, width: int) -> list[Control]:
    """The Controls of one run: each image resized to the output's size (diffusers' control image processor:
    RGB, Lanczos, / 255)."""
    import numpy as np
    from PIL import Image

    controls = []
    for c in loaded:
        channels = c.net.config["conditioning_channels"]
        im = c.image.convert("L" if channels == 1 else "RGB")
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.LANCZOS)
        arr = np.asarray(im, dtype=np.float32).reshape(height, width, -1) / 255.0
        controls.append(Control(c.net, torch.from_numpy(arr.copy()).permute(2, 0, 1)[None], c.spec.scale,
                                c.spec.start, c.spec.end))
    return controls
