"""NaN/inf losses: isolated ones are skipped and counted, persistent ones stop the run cleanly."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from ldm.training.run.train import build_diffusion_module


def _fit(cfg, bad_steps, max_steps):
    module = build_diffusion_module(cfg)
    encode = module.encode_images
    calls = {"n": 0}

    def poisoned(batch):
        latents = encode(batch)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return latents * float("nan") if step in bad_steps else latents

    module.encode_images = poisoned
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    return module, trainer, instantiate(cfg.data)


def test_isolated_nan_steps_are_skipped(tiny_cfg):
    module, trainer, data = _fit(tiny_cfg("trainer.limit_val_batches=0"), bad_steps={1, 3}, max_steps=4)
    trainer.fit(module, datamodule=data)
    assert module.guard.nonfinite_total == 2
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())
    assert trainer.global_step == 4  # skipped batches do not step the optimizer


def test_persistent_nan_stops_with_a_clear_message(tiny_cfg):
    module, trainer, data = _fit(tiny_cfg("module.max_nonfinite_steps=3"), bad_steps=set(range(2, 100)),
                                 max_steps=20)
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        trainer.fit(module, datamodule=data)
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())
