"""At the start of a diffusion run: does the frozen VAE reproduce the training images? (PSNR, colour shift.)"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ldm.evaluation.reconstruction import ReconstructionReport, check_autoencoder
from ldm.training.callbacks.result import ResultCallback

log = logging.getLogger("ldm.training")

FIX = ("train a VAE on these images first: leave model.autoencoder.weights at auto (data=folder / hf / webdataset "
       "then train one when this check fails) or run python train.py experiment=own_data data.train.root=<your "
       "folder> (stage 1 fits one, stage 2 trains the diffusion model on its latents), or set "
       "model.autoencoder.weights / model.pretrained to a VAE that fits this data")


def sample_images(dataset, n: int, seed: int) -> torch.Tensor | None:
    """``n`` training images (see sample_items), or None when the items carry no images. With aspect-ratio buckets
    (images of several sizes) those of the most common size among them (the first such size on a tie)."""
    from collections import Counter

    from ldm.evaluation.eval_set import sample_items

    images = [item.get("image") for item in sample_items(dataset, n, seed)]
    if not images or not all(isinstance(im, torch.Tensor) for im in images):
        return None
    size = Counter(tuple(im.shape) for im in images).most_common(1)[0][0]
    return torch.stack([im for im in images if tuple(im.shape) == size]).float()


class VAECheckCallback(ResultCallback):
    """Measures the frozen first stage's round trip on ``n_images`` training images when fitting starts, logs
    ``vae_check/psnr_db`` and ``vae_check/colour_shift`` and warns, naming the fix, when it is poor
    (ldm.evaluation.reconstruction: PSNR < 22 dB or a mean colour shift > 8/255). ``report`` keeps the result."""

    def __init__(self, n_images: int = 32, seed: int = 0):
        self.n_images, self.seed = int(n_images), int(seed)
        self.report: ReconstructionReport | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        from ldm.models.autoencoder import IdentityAutoencoder
        from ldm.training.callbacks.sampling import training_source

        ae = getattr(pl_module, "autoencoder", None)
        if ae is None or isinstance(ae, IdentityAutoencoder) or not hasattr(pl_module, "unet"):
            return  # pixel space, or the autoencoder stage itself
        if trainer.datamodule is not None:
            trainer.datamodule.setup("fit")
        images = sample_images(training_source(trainer), self.n_images, self.seed)
        if images is None:
            log.info("vae check: skipped (the training items carry no images)")
            return
        was_training = ae.training
        ae.eval()
        self.report = check_autoencoder(ae, images.to(pl_module.device))
        ae.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics({"vae_check/psnr_db": self.report.psnr_db,
                                "vae_check/colour_shift": self.report.colour_shift}, step=trainer.global_step)
        if trainer.is_global_zero:
            print(f"vae check (frozen first stage on {self.report.n_images} training images): {self.report}")
            if self.report.poor:
                log.warning("the frozen VAE reconstructs the training images poorly (%s): samples will show its "
                            "errors (wrong colours, blur). Fix: %s", self.report, FIX)

    def result(self) -> dict[str, Any]:
        return {"vae_check": self.report.as_dict()} if self.report is not None else {}
