"""trainer.precision on the CPU: 16-mixed really is fp16 autocast with loss scaling.

Lightning replaces ``precision=16-mixed`` on the CPU by bf16-mixed (a warning; from the days when torch had no
CPU fp16 autocast). torch >= 2.3 has both CPU fp16 autocast and ``torch.amp.GradScaler("cpu")``, so here the
16-mixed plugin is passed explicitly (lightning/pytorch/plugins/precision/amp.py ``MixedPrecision``, which makes
that scaler) and the Trainer's own precision flag is left unset."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

FP16_MIXED = ("16-mixed", "16", 16)


def precision_overrides(cfg: DictConfig) -> dict[str, Any]:
    """Extra Trainer arguments: {"precision": None, "plugins": [MixedPrecision("16-mixed", "cpu")]} for fp16
    mixed precision on the CPU, else {}."""
    trainer = cfg.trainer
    if OmegaConf.select(trainer, "accelerator") != "cpu" or OmegaConf.select(trainer, "precision") not in FP16_MIXED:
        return {}
    from lightning.pytorch.plugins.precision import MixedPrecision

    return {"precision": None, "plugins": [MixedPrecision("16-mixed", "cpu")]}


def check_precision(cfg: DictConfig) -> str | None:
    """An error message for a fused optimizer under fp16 loss scaling, or None: a fused AdamW unscales inside its
    step, so Lightning cannot unscale before gradient clipping and the divergence guard (it refuses)."""
    if OmegaConf.select(cfg, "trainer.precision") in FP16_MIXED and OmegaConf.select(cfg, "optim.fused"):
        return ("trainer.precision=16-mixed (fp16 loss scaling) needs the gradients unscaled before clipping: set "
                "optim.fused=false (a fused optimizer unscales inside its step), or use trainer.precision=bf16-mixed")
    return None
