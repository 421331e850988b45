"""Optimizers the optim group names that are not in torch itself: optim=adamw8bit, prodigy, adamw_schedulefree,
lion, came (each a kept library: pip install -e '.[bnb]' / '.[optim]').

optim=adamw and optim=adafactor point at torch.optim.AdamW / torch.optim.Adafactor directly. The wrappers here
import their library when the run builds its optimizer (a missing one is named with its pip command) and pass
plain floats and tuples, so that the parameter groups a checkpoint stores load with ``weights_only=True``."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterable, Sequence

import torch

OTHER_CHOICES = "optim=adamw / optim=adafactor"


def _library(module: str, option: str, extra: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"optim={option} needs {package}: pip install -e '.[{extra}]' (or pip install {package}; "
                          f"it keeps the installed torch), or choose {OTHER_CHOICES}") from e


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def adamw8bit(params: Iterable, lr: float = 1e-3, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8,
              min_8bit_size: int = 4096) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): both Adam
    moments stored as 8-bit block-wise quantized tensors (uint8 + one float32 absmax per 256 values). Runs on the
    CPU (bitsandbytes >= 0.48's CPU backend) and on CUDA."""
    bnb = _library("bitsandbytes", "adamw8bit", "bnb", "bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=lr, betas=_floats(betas), eps=eps, weight_decay=weight_decay,
                               min_8bit_size=min_8bit_size)


def prodigy(params: Iterable, lr: float = 1.0, betas=(0.9, 0.999), weight_decay: float = 0.0, d_coef: float = 1.0,
            d0: float = 1e-6, use_bias_correction: bool = False, safeguard_warmup: bool = False,
            eps: float = 1e-8) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner"): Adam whose
    step size d * lr estimates the distance to the solution, D, as it trains (d starts at d0 and only grows), so
    ``lr`` is a multiplier of the estimate: 1.0, and d_coef scales d (0.5: smaller steps). safeguard_warmup keeps
    a warm-up's small early lr from inflating d; use_bias_correction is Adam's bias correction on the step. d and
    its sums live in the parameter groups (so in the checkpoint); all groups must share one lr."""
    opt = _library("prodigyopt", "prodigy", "optim", "prodigyopt")
    return opt.Prodigy(params, lr=lr, betas=_floats(betas), weight_decay=weight_decay, d_coef=d_coef, d0=d0,
                       use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, eps=eps)


def adamw_schedulefree(params: Iterable, lr: float = 2.5e-3, betas=(0.9, 0.999), weight_decay: float = 0.0,
                       warmup_steps: int = 0, eps: float = 1e-8, r: float = 0.0,
                       weight_lr_power: float = 2.0) -> torch.optim.Optimizer:
    """Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled", Alg. 1): the gradient is taken at
    y = (1 - beta1) z + beta1 x, z takes Adam's step and x is the running average of the z's (weights lr_max^2):
    no decaying schedule is needed, a constant lr after the warm-up. The parameters hold y while training and x
    after ``optimizer.eval()``: LatentDiffusion switches them at validation, sampling, the EMA update, checkpoints
    and the run's files (ldm.training.module.optimizer_mode)."""
    sf = _library("schedulefree", "adamw_schedulefree", "optim", "schedulefree")
    return sf.AdamWScheduleFree(params, lr=lr, betas=_floats(betas), weight_decay=weight_decay,
                                warmup_steps=warmup_steps, eps=eps, r=r, weight_lr_power=weight_lr_power)


def lion(params: Iterable, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the update is
    sign(beta1 m + (1 - beta1) g), every coordinate moved by exactly lr; one moment (half of AdamW's state). Its
    paper's rule of thumb: lr 3-10x smaller and weight decay 3-10x larger than AdamW's."""
    lp = _library("lion_pytorch", "lion", "optim", "lion-pytorch")
    return lp.Lion(params, lr=lr, betas=_floats(betas), weight_decay=weight_decay)


def came(params: Iterable, lr: float = 2e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
         clip_threshold: float = 1.0, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """CAME (Luo et al. 2023, "CAME: Confidence-guided Adaptive Memory Efficient Optimization"): Adafactor's
    factored second moment (rows + columns per matrix) with a first moment, scaled by a factored confidence term
    (the third beta); optimizer state well under AdamW's for large matrices."""
    cp = _library("came_pytorch", "came", "optim", "came-pytorch")
    return cp.CAME(params, lr=lr, betas=_floats(betas), eps=_floats(eps), clip_threshold=clip_threshold,
                   weight_decay=weight_decay)


# optimizers whose averaging replaces a decaying learning rate: a constant schedule (after the warm-up) only
CONSTANT_LR_TARGETS = (f"{__name__}.adamw_schedulefree", "schedulefree.")


def check_lr_schedule(cfg: Any) -> str | None:
    """A problem with the run's lr_scheduler for its optimizer (None: fine). Schedule-free AdamW's x is an average
    weighted by the lr reached so far: a decaying schedule fights it (the paper's point is to need none)."""
    from omegaconf import OmegaConf

    target = str(OmegaConf.select(cfg, "optim._target_", default="") or "")
    schedule = OmegaConf.select(cfg, "lr_scheduler.schedule", default=None)
    if target.startswith(CONSTANT_LR_TARGETS) and schedule not in (None, "constant"):
        return (f"optim=adamw_schedulefree needs a constant learning rate after the warm-up (its average of the "
                f"iterates replaces the decay), got lr_scheduler.schedule={schedule}: set "
                f"lr_scheduler.schedule=constant (lr_scheduler.warmup_steps is kept) or choose another optim")
    return None
