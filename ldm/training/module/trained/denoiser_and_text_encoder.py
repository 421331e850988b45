"""The denoiser and the text encoder train together (``model.text_encoder.frozen=false``: the from-scratch tiny CLIP
of experiment=own_data, where nothing pretrained is to be preserved). The encoder has its own parameter group
(``module.text_encoder_lr``; null: optim.lr) and its own EMA copy."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ldm.models.bundle import ModelBundle
from ldm.training.module.ema import EMA
from ldm.training.module.trained.base import Networks
from ldm.training.module.trained.denoiser import WholeDenoiser


class DenoiserAndTextEncoder(WholeDenoiser):
    text_encoder_learns = True

    def __init__(self, networks: Networks, ema_decay: float | None, text_encoder_lr: float | None = None):
        super().__init__(networks, ema_decay)
        self.text_encoder_lr = text_encoder_lr
        networks.text_encoder.requires_grad_(True)
        self.ema_text = EMA(networks.text_encoder, ema_decay) if ema_decay else None

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(), **({"ema_text": self.ema_text} if self.ema_text is not None else {})}

    def parameters(self) -> list[nn.Parameter]:
        return super().parameters() + list(self.networks.text_encoder.parameters())

    def param_groups(self) -> list[dict[str, Any]]:
        lr = {"lr": float(self.text_encoder_lr)} if self.text_encoder_lr is not None else {}
        return [{"params": list(self.networks.unet.parameters()), "name": "unet"},
                {"params": list(self.networks.text_encoder.parameters()), "name": "text_encoder", **lr}]

    def set_train_mode(self) -> None:
        """Both networks are in train mode (the module's .train() put them there)."""

    def update_ema(self, applied: Tensor | None = None) -> None:
        super().update_ema(applied)
        if self.ema_text is not None:
            self.ema_text.update(self.networks.text_encoder, applied)

    def bundle(self, global_step: int, use_ema: bool) -> ModelBundle:
        use_text_ema = use_ema and self.ema_text is not None
        bundle = super().bundle(global_step, use_ema)
        bundle.text_encoder = self.ema_text.model if use_text_ema else self.networks.text_encoder
        return bundle
