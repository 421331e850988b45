"""The default trained part: the whole denoiser (U-Net) trains; the text encoder and the autoencoder stay frozen.
Its EMA (Polyak averaging of every U-Net weight) is what sampling and exports use."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import Tensor, nn

from ldm.models.bundle import ModelBundle
from ldm.training.module.ema import EMA
from ldm.training.module.trained.base import Networks, RunEnd, freeze, UNetAsIs


class WholeDenoiser(UNetAsIs):
    text_encoder_learns = False
    strict_loading = True

    def __init__(self, networks: Networks, ema_decay: float | None):
        self.networks = networks
        self.ema = EMA(networks.unet, ema_decay) if ema_decay else None

    def modules(self) -> dict[str, nn.Module]:
        return {"ema": self.ema} if self.ema is not None else {}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.networks.unet.parameters())

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.networks.unet.parameters())}]  # only the U-Net trains

    def set_train_mode(self) -> None:
        freeze(self.networks.text_encoder)

    def update_ema(self, applied: Tensor | None = None) -> None:
        if self.ema is not None:
            self.ema.update(self.networks.unet, applied)

    def checkpoint_entries(self, checkpoint: dict[str, Any]) -> None:
        """The whole state dict stays: U-Net, EMA and the frozen parts (a checkpoint that samples on its own)."""

    def check_loaded(self, checkpoint: dict[str, Any], expected: list[str]) -> None:
        """Lightning's strict loading checks every key."""

    @contextmanager
    def sampling_bundle(self, global_step: int, use_ema: bool) -> Iterator[ModelBundle]:
        yield self.bundle(global_step, use_ema)

    def bundle(self, global_step: int, use_ema: bool) -> ModelBundle:
        """The EMA copy when asked for and kept (a separate module: training is untouched)."""
        unet = self.ema.model if (use_ema and self.ema is not None) else None
        return self.networks.bundle(global_step, unet=unet)

    def write_files(self, end: RunEnd) -> dict[str, str]:
        return {}  # the checkpoint is the result (python -m ldm.export turns it into files others load)
