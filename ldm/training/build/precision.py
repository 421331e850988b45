"""trainer.precision: the mixed-precision plugin train.py hands Lightning itself, for two cases Lightning gets wrong.

1. 16-mixed on the CPU really is fp16 autocast with loss scaling. Lightning replaces ``precision=16-mixed`` on the
   CPU by bf16-mixed (a warning; from the days when torch had no CPU fp16 autocast). torch >= 2.3 has both CPU fp16
   autocast and ``torch.amp.GradScaler("cpu")``, so the 16-mixed plugin is passed explicitly
   (lightning/pytorch/plugins/precision/amp.py ``MixedPrecision``, which makes that scaler).
2. bf16-mixed with a fused optimizer (optim=adamw's default ``fused: true``) and gradient clipping (trainer's
   default ``gradient_clip_val: 1.0``): Lightning's ``MixedPrecision.clip_gradients`` refuses any optimizer that
   "unscales inside its step" at the first step, though bf16 has no loss scale to undo (no GradScaler). That was
   trainer=gpu's default combination: every GPU run stopped at step 1. ``ClippableMixedPrecision`` clips as
   fp32 does when there is no scaler, and keeps Lightning's refusal where there is one (fp16: config_checks refuses
   a fused optimizer before training instead).

In both cases the Trainer's own precision flag is left unset. FSDPStrategy brings its own plugin (FSDPPrecision,
which clips through the sharded module): nothing is passed there."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from omegaconf import DictConfig, OmegaConf

FP16_MIXED = ("16-mixed", "16", 16)
BF16_MIXED = ("bf16-mixed", "bf16")


class ClippableMixedPrecision(MixedPrecision):
    """Lightning's MixedPrecision whose gradient clipping works with fused optimizers when nothing is scaled."""

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None) -> None:
        if self.scaler is None:  # bf16: the gradients are the true ones; a fused step unscales nothing
            kwargs = {} if gradient_clip_algorithm is None else {"gradient_clip_algorithm": gradient_clip_algorithm}
            return Precision.clip_gradients(self, optimizer, clip_val, **kwargs)
        return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)


def autocast_device(accelerator: Any) -> str:
    """The device type autocast runs on for ``trainer.accelerator``."""
    accelerator = str(accelerator or "auto").lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def precision_overrides(cfg: DictConfig) -> dict[str, Any]:
    """Extra Trainer arguments: {"precision": None, "plugins": [plugin]} for fp16 mixed precision on the CPU and for
    bf16 mixed precision (not under FSDPStrategy), else {}."""
    trainer = cfg.trainer
    precision = OmegaConf.select(trainer, "precision")
    device = autocast_device(OmegaConf.select(trainer, "accelerator"))
    strategy = OmegaConf.select(trainer, "strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "fsdp" in target.lower():  # FSDPStrategy: its FSDPPrecision
        return {}
    if precision in FP16_MIXED and device == "cpu":
        return {"precision": None, "plugins": [ClippableMixedPrecision("16-mixed", "cpu")]}
    if precision in BF16_MIXED:
        return {"precision": None, "plugins": [ClippableMixedPrecision("bf16-mixed", device)]}
    return {}


def check_precision(cfg: DictConfig) -> str | None:
    """An error message for a fused optimizer under fp16 loss scaling, or None: a fused AdamW unscales inside its
    step, so Lightning cannot unscale before gradient clipping and the divergence guard (it refuses)."""
    if OmegaConf.select(cfg, "trainer.precision") in FP16_MIXED and OmegaConf.select(cfg, "optim.fused"):
        return ("trainer.precision=16-mixed (fp16 loss scaling) needs the gradients unscaled before clipping: set "
                "optim.fused=false (a fused optimizer unscales inside its step), or use trainer.precision=bf16-mixed")
    return None
