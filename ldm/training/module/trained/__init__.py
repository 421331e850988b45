"""What a run trains (see ``base.TrainedPart``): one file per kind, chosen here from the run's adapter config."""

from __future__ import annotations

from ldm.models.controlnet import ControlNetTraining
from ldm.models.lora import LoRAConfig
from ldm.models.textual_inversion import TextualInversionConfig
from ldm.training.module.trained.controlnet import ControlNetPart
from ldm.training.module.trained.base import Networks, RunEnd, TrainedPart, freeze
from ldm.training.module.trained.denoiser import WholeDenoiser
from ldm.training.module.trained.denoiser_and_text_encoder import DenoiserAndTextEncoder
from ldm.training.module.trained.lora import LoRAAdapter
from ldm.training.module.trained.textual_inversion import TextualInversionRows

# adapter config type (configs/adapter/) -> the part that trains it on a frozen base
ADAPTERS = {LoRAConfig: LoRAAdapter, TextualInversionConfig: TextualInversionRows, ControlNetTraining: ControlNetPart}

__all__ = ["ADAPTERS", "Networks", "RunEnd", "TrainedPart", "freeze", "trained_part"]


def trained_part(networks: Networks, adapter=None, ema_decay: float | None = None,
                 text_encoder_lr: float | None = None) -> TrainedPart:
    """The part a run trains: an adapter's (adapter=...), else the U-Net, with the text encoder when it was built
    with ``frozen=false`` (nothing pretrained to preserve)."""
    if text_encoder_lr is not None and not float(text_encoder_lr) > 0:
        raise ValueError(f"module.text_encoder_lr must be > 0 (or null: optim.lr), got {text_encoder_lr!r}")
    trains_text_encoder = not networks.text_encoder.frozen
    if not trains_text_encoder:
        freeze(networks.text_encoder)  # before an adapter attaches to it (its own weights train)
    if adapter is not None:
        if trains_text_encoder:
            raise ValueError("model.text_encoder.frozen=false with adapter=lora: a LoRA run keeps its base frozen "
                             "(adapter.text_encoder=true adapts the text encoder instead)")
        if type(adapter) not in ADAPTERS:
            raise ValueError(f"adapter: {type(adapter).__name__} is not a known adapter config "
                             f"({', '.join(t.__name__ for t in ADAPTERS)})")
        return ADAPTERS[type(adapter)](networks, adapter, ema_decay)
    if trains_text_encoder:
        return DenoiserAndTextEncoder(networks, ema_decay, text_encoder_lr)
    return WholeDenoiser(networks, ema_decay)
