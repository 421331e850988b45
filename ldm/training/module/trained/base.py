"""What a run trains, as one object: the protocol every kind of trained part follows.

A latent-diffusion run always has the same frozen-or-not networks (denoiser, autoencoder, text encoder) and the same
loop (the seed's Algorithm 1). What differs between a full fine-tune, a fine-tune that trains the text encoder too,
an adapter network and textual-inversion rows is only *what* the optimizer updates and what follows from that:
parameter groups, the EMA, what a checkpoint holds, how the model is sampled mid-run and which files the run writes
at its end. ``LatentDiffusion`` holds one :class:`TrainedPart` and never asks which kind it is; a new kind is a new
file in this folder (and a line in ``trained/__init__.py``'s table).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from torch import Tensor, nn

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle


def freeze(module: nn.Module) -> nn.Module:
    """Frozen for real: no gradients, eval mode (dropout/BN off)."""
    return module.requires_grad_(False).eval()


@dataclass
class Networks:
    """The networks a run holds (shared by the module and its trained part; the part decides which train)."""

    unet: nn.Module
    autoencoder: nn.Module
    text_encoder: nn.Module
    schedule: NoiseSchedule

    def roots(self) -> dict[str, nn.Module]:
        """The networks an adapter may attach to, by the names adapter files use."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def bundle(self, global_step: int, unet: nn.Module | None = None,
               text_encoder: nn.Module | None = None) -> ModelBundle:
        """A ModelBundle of these networks (or of the given replacements: an EMA copy, a merged copy)."""
        return ModelBundle(unet if unet is not None else self.unet, self.autoencoder,
                           text_encoder if text_encoder is not None else self.text_encoder, self.schedule,
                           source="training", meta={"global_step": global_step})


@dataclass
class RunEnd:
    """What a part needs to write its files when training ends."""

    run_dir: Path
    global_step: int
    model_config: dict[str, Any]


class TrainedPart(Protocol):
    """One kind of thing a run trains.

    ``modules()`` are registered on the LightningModule under their names, which are the state-dict prefixes of
    the checkpoint (``lora.``, ``ema.``, ``ema_text.``, ...): files written by earlier versions keep loading.
    """

    text_encoder_learns: bool  # gradients flow through the text encoder: contexts are computed, never cached
    strict_loading: bool  # False when the checkpoint holds only the part (the base comes from model.pretrained)

    def modules(self) -> dict[str, nn.Module]:
        """The part's own modules (adapter, EMA copies) to register on the LightningModule, in order."""
        ...

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer updates (gradient norm, divergence skip)."""
        ...

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (each named; an ``lr`` where the part's config overrides optim.lr)."""
        ...

    def denoiser(self, forward: Callable, batch: dict[str, Any]) -> Callable:
        """The denoiser a batch trains (and validates) through: ``forward(x_t, t, context, **unet_kwargs)`` itself,
        or with what the part adds from the batch (a ControlNet's residuals from its conditioning images)."""
        ...

    def controls(self, images: Tensor, use_ema: bool) -> list:
        """What sampling applies with control images (B, C, H, W) in [0, 1]: a ControlNet's
        ``ldm.pipelines.controlnet.Control``, or nothing."""
        ...

    def set_train_mode(self) -> None:
        """After ``module.train()``: put the frozen networks back in eval mode and set what learns."""
        ...

    def update_ema(self, applied: Tensor | None = None) -> None:
        """After every optimizer step; ``applied`` is its verdict as a bool on the device (None: applied), which
        weights the update (a skipped step leaves the EMA alone, with no host branch)."""
        ...

    def checkpoint_entries(self, checkpoint: dict[str, Any]) -> None:
        """Filter ``checkpoint["state_dict"]`` to what the part needs to resume, and record its config under
        ``checkpoint["ldm"]``."""
        ...

    def check_loaded(self, checkpoint: dict[str, Any], expected: list[str]) -> None:
        """Before resuming from ``checkpoint``: a clear ValueError if it was not made by this kind of part / config
        (``expected``: the module's state-dict keys)."""
        ...

    def sampling_bundle(self, global_step: int, use_ema: bool) -> AbstractContextManager[ModelBundle]:
        """The model as sampling sees it, for the length of a block, sharing the training networks."""
        ...

    def bundle(self, global_step: int, use_ema: bool) -> ModelBundle:
        """The model as sampling sees it, as copies where the training networks would otherwise change."""
        ...

    def write_files(self, end: RunEnd) -> dict[str, str]:
        """The files the run leaves for users (adapter / embedding files) when training ends: {kind: path}."""
        ...


class UNetAsIs:
    """``denoiser`` and ``controls`` of every part that adds nothing to the U-Net's inputs (all but a ControlNet)."""

    def denoiser(self, forward: Callable, batch: dict[str, Any]) -> Callable:
        return forward

    def controls(self, images: Tensor, use_ema: bool) -> list:
        return []


def state_with_prefixes(checkpoint: dict[str, Any], prefixes: tuple[str, ...]) -> None:
    """Keep only the entries of the checkpoint's state dict under ``prefixes`` (the frozen base is not saved)."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefixes)}


def check_has_keys(checkpoint: dict[str, Any], expected: list[str], prefixes: tuple[str, ...]) -> None:
    """The checkpoint holds every key of this part's config (under ``prefixes``)."""
    missing = sorted({k for k in expected if k.startswith(prefixes)} - set(checkpoint["state_dict"]))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} adapter weights of this config (e.g. "
                         f"{', '.join(missing[:3])}): was it trained with another adapter.preset / rank?")
