"""ControlNet sampling as a model wrapper (as guidance is one): the samplers call ``model(x, t, context)`` and the
wrapper adds the residuals of one or several ControlNets, each with its control image, scale and guidance range.

The range is diffusers' ``control_guidance_start`` / ``control_guidance_end``: step i of n runs a ControlNet when
``start <= i / n`` and ``(i + 1) / n <= end`` (StableDiffusionControlNetPipeline's ``controlnet_keep``); several
ControlNets' residuals add up (diffusers' MultiControlNetModel). The step of a call is the sampling timestep nearest
to its t (a second-order sampler's in-between evaluation counts as the step it belongs to).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn


@dataclass
class Control:
    """One ControlNet's part in a sampling run. image: (1 or B, conditioning_channels, H, W) in [0, 1] at the
    output image's size (diffusers' control image: RGB / 255, not normalised)."""

    net: nn.Module
    image: Tensor
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps before which this ControlNet is off
    end: float = 1.0  # ... and after which it is off again

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"control guidance range must satisfy 0 <= start < end <= 1, got start={self.start}, "
                             f"end={self.end}")


def _rows(image: Tensor, batch: int) -> Tensor:
    """The control image for a model call of ``batch`` rows: CFG's doubled batch repeats it ([uncond; cond])."""
    if batch % image.shape[0]:
        raise ValueError(f"{image.shape[0]} control images for a batch of {batch}")
    return image.repeat(batch // image.shape[0], 1, 1, 1)


def add_residuals(a, b):
    """Two ControlNets' (down, mid) residuals summed (MultiControlNetModel)."""
    if a is None:
        return b
    return [x + y for x, y in zip(a[0], b[0])], a[1] + b[1]


class ControlledUNet:
    """``model(x, t, context)`` = ``unet(x, t, context, control=sum of the ControlNets' residuals)``; ``unet`` may be
    a wrapper that forwards ``control`` (the inpainting U-Net's input), the ControlNets see the latents x."""

    def __init__(self, unet: Callable, controls: Sequence[Control], timesteps: Tensor):
        self.unet, self.controls = unet, list(controls)
        self.timesteps = torch.as_tensor(timesteps).float().flatten().cpu()
        n = len(self.timesteps)
        # diffusers' controlnet_keep: 1 inside [start, end] of the steps, else 0
        self.keep = [[1.0 - float(i / n < c.start or (i + 1) / n > c.end) for c in self.controls] for i in range(n)]

    def step(self, t) -> int:
        t0 = torch.as_tensor(t).flatten()[0].float().cpu()
        return int((self.timesteps - t0).abs().argmin())

    def __call__(self, x: Tensor, t, context, **kwargs) -> Tensor:
        keep = self.keep[self.step(t)]
        control = None
        for c, k in zip(self.controls, keep):
            if k == 0.0:
                continue
            hint = _rows(c.image, x.shape[0]).to(x.device, x.dtype)
            control = add_residuals(control, c.net(x, t, context, hint, scale=c.scale * k))
        return self.unet(x, t, context, control=control, **kwargs)


def check_controls(controls: Sequence[Control], height: int, width: int, batch: int, latent_factor: int) -> None:
    """Each control image is (1 or ``batch``, C, height, width) and its ControlNet's hint encoder reaches the
    latent grid (its hint_factor equals the VAE's factor)."""
    for i, c in enumerate(controls):
        img = c.image
        want_c = c.net.config["conditioning_channels"]
        if img.ndim != 4 or img.shape[1] != want_c or tuple(img.shape[-2:]) != (height, width):
            raise ValueError(f"control image {i}: shape {tuple(img.shape)}, need (1 or {batch}, {want_c}, {height}, "
                             f"{width})")
        if img.shape[0] not in (1, batch):
            raise ValueError(f"control image {i}: {img.shape[0]} images for a batch of {batch} (give 1 or {batch})")
        if c.net.hint_factor != latent_factor:
            raise ValueError(f"ControlNet {i}: its hint encoder downsamples by {c.net.hint_factor}, the VAE by "
                             f"{latent_factor}; they must agree")


def controlled(model: Callable, controls: Sequence[Control] | None, timesteps: Tensor, *, height: int, width: int,
               batch: int, latent_factor: int) -> Callable:
    """``model`` with the ControlNets' residuals (``model`` itself when there are none: no cost)."""
    if not controls:
        return model
    check_controls(controls, height, width, batch, latent_factor)
    controls = [Control(c.net, c.image.expand(batch, *c.image.shape[1:]), c.scale, c.start, c.end) for c in controls]
    return ControlledUNet(model, controls, timesteps)
