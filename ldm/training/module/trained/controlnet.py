"""adapter=controlnet: a ControlNet (Zhang et al. 2023) trains on the frozen U-Net, text encoder and VAE. Every batch
carries a ``conditioning_image`` (B, C, H, W) in [0, 1]; the denoiser of a batch is the frozen U-Net plus the
ControlNet's residuals from it (diffusers' train_controlnet.py). Only the ControlNet (and its EMA) is optimised and
checkpointed; the run ends with ``<run>/controlnet/`` (diffusers ControlNetModel folder) and
``<run>/controlnet.safetensors`` (``control_model.*``: A1111, ComfyUI), both the EMA weights when kept."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable, Iterator

from torch import Tensor, nn

from ldm.models.bundle import ModelBundle
from ldm.models.controlnet import ControlNet, ControlNetTraining
from ldm.training.module.ema import EMA
from ldm.training.module.trained.base import Networks, RunEnd, check_has_keys, freeze, state_with_prefixes

PREFIXES = ("controlnet.", "ema.")  # what a ControlNet run's checkpoint holds
CONDITIONING_KEY = "conditioning_image"  # the batch entry (diffusers' train_controlnet.py column name)


class ControlNetPart:
    text_encoder_learns = False
    strict_loading = False  # the checkpoint holds only the ControlNet; the base comes from model.pretrained again

    def __init__(self, networks: Networks, config: ControlNetTraining, ema_decay: float | None):
        self.networks, self.config = networks, config
        networks.unet.requires_grad_(False)  # frozen, left in train mode like LoRA's base (checkpointing needs it)
        factor = networks.autoencoder.downsample_factor
        self.net = self._initial(networks.unet, config, config.hint_widths(factor))
        if self.net.hint_factor != factor:  # the hint encoder must bring the image to the latent grid
            raise ValueError(f"adapter.hint_channels {list(self.net.config['hint_channels'])} downsample by "
                             f"{self.net.hint_factor} but the VAE by {factor}: give {int(math.log2(factor)) + 1} "
                             "widths (SD: [16, 32, 96, 256]), or adapter.hint_channels=auto")
        self.ema = EMA(self.net, ema_decay) if ema_decay else None

    @staticmethod
    def _initial(unet: nn.Module, config: ControlNetTraining, hint_channels: tuple[int, ...]) -> ControlNet:
        if config.init_from is None:  # the paper's initialisation: a copy of the U-Net's encoder, zero convs
            return ControlNet.from_unet(unet, conditioning_channels=config.conditioning_channels,
                                        hint_channels=hint_channels)
        from ldm.formats.controlnet_file import read_controlnet

        net = read_controlnet(config.init_from, unet.config)
        return net.to(next(unet.parameters()).device)

    def modules(self) -> dict[str, nn.Module]:
        return {"controlnet": self.net, **({"ema": self.ema} if self.ema is not None else {})}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.parameters(), "name": "controlnet",
                 **({"lr": float(self.config.lr)} if self.config.lr else {})}]

    def denoiser(self, forward: Callable, batch: dict[str, Any]) -> Callable:
        """The U-Net with the ControlNet's residuals from the batch's conditioning images."""
        if CONDITIONING_KEY not in batch:
            raise ValueError(f"adapter=controlnet needs batches with {CONDITIONING_KEY!r}: use data=controlnet "
                             "(image, conditioning_image and text per sample)")
        hint = batch[CONDITIONING_KEY]

        def model(x_t: Tensor, t: Tensor, context) -> Tensor:
            return forward(x_t, t, context, control=self.net(x_t, t, context, hint.to(x_t.dtype)))

        return model

    def controls(self, images: Tensor, use_ema: bool) -> list:
        """The (EMA) ControlNet with these control images, for sampling (the callbacks' control | sample | real)."""
        from ldm.pipelines.controlnet import Control

        net = self.weights(use_ema)
        return [Control(net, images.to(next(net.parameters()).device))]

    def set_train_mode(self) -> None:
        freeze(self.networks.text_encoder)

    def update_ema(self, applied: Tensor | None = None) -> None:
        if self.ema is not None:
            self.ema.update(self.net, applied)

    def checkpoint_entries(self, checkpoint: dict[str, Any]) -> None:
        state_with_prefixes(checkpoint, PREFIXES)  # the ControlNet (and its EMA), not the frozen base
        hint = list(self.net.config["hint_channels"])  # the widths built (auto resolved)
        checkpoint["ldm"]["controlnet"] = {**asdict(self.config), "hint_channels": hint}

    def check_loaded(self, checkpoint: dict[str, Any], expected: list[str]) -> None:
        check_has_keys(checkpoint, expected, PREFIXES)

    def weights(self, use_ema: bool = True) -> ControlNet:
        return self.ema.model if (use_ema and self.ema is not None) else self.net

    @contextmanager
    def sampling_bundle(self, global_step: int, use_ema: bool) -> Iterator[ModelBundle]:
        """The base model (its networks are frozen: nothing to copy); the ControlNet is sampled with
        ``weights()`` and a control image (sample.py controlnet=<run>/controlnet)."""
        yield self.networks.bundle(global_step)

    def bundle(self, global_step: int, use_ema: bool) -> ModelBundle:
        return self.networks.bundle(global_step)

    def write_files(self, end: RunEnd) -> dict[str, str]:
        from ldm.formats.controlnet_file import write_controlnet_folder, write_controlnet_single_file

        net = self.weights(use_ema=True)
        folder = write_controlnet_folder(net, end.run_dir / "controlnet")
        single = write_controlnet_single_file(net, end.run_dir / "controlnet.safetensors")
        print(f"ControlNet: {folder} (diffusers), {single} (control_model.*)")
        return {"controlnet": str(folder), "controlnet_single_file": str(single)}
