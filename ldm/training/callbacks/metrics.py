"""FID, KID, CLIP score and prompt accuracy (with the checker the data offers) of generated samples, computed
while training.

The validation loss at fixed timesteps and noise is the module's own ``val/loss``; this callback adds the
sample-quality metrics of :mod:`ldm.evaluation.metrics` at validation time and logs them as ``val/<name>`` to every
logger (through ``pl_module.log``, so checkpointing and sweeps can use them too).

Enable it with ``callbacks=metrics`` (configs/callbacks/metrics.yaml: the default callbacks plus this one).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning as L

from ldm.evaluation.eval_set import EvalItems, first_items, prompt_checker
from ldm.evaluation.metrics import METRIC_NAMES, ImageMetrics, build_image_metrics, score_share
from ldm.pipelines.sampling_options import SamplingOptions
from ldm.training.callbacks.sampling import TRAINING_SAMPLER, data_resolution, generate

log = logging.getLogger("ldm.training")


class ImageMetricsCallback(L.Callback):
    """At a validation run (once ``every_n_steps`` optimizer steps have passed since the last one; 0 = at every
    validation) generate images for the captions of the first ``n_images`` validation items and compute
    ``metrics`` (any of fid, kid, clip_score, prompt_accuracy) against those images and captions.

    Every process generates its share of the prompts and torchmetrics reduces the states across processes, so the
    value is that of the whole set (``n_images`` is rounded down to a multiple of the number of processes so that
    every process makes the same number of model calls). Sampling uses explicit seeds (batch starting at item i:
    ``seed + i``) and leaves the training RNG alone.

    Feature extractors come from local files only: ``inception_weights`` (torch-fidelity's
    weights-inception-2015-12-05-6726825d.pth) for FID / KID, ``clip_model`` (a transformers CLIP folder) for CLIP
    score. They are checked when training starts: a missing one is reported once, naming the file, where to get it
    and the config key (``key_prefix`` + name), and training goes on without that metric.
    """

    def __init__(self, metrics: Sequence[str] = METRIC_NAMES, n_images: int = 256, every_n_steps: int = 0,
                 inception_weights: str | None = None, clip_model: str | None = None,
                 sampler: Any = TRAINING_SAMPLER, guidance_scale: float = 4.0, seed: int = 0, use_ema: bool = True,
                 batch_size: int = 64, kid_subset_size: int = 100, key_prefix: str = "callbacks.metrics."):
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"{key_prefix}metrics: unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
        for name, value in (("n_images", n_images), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"{key_prefix}{name} must be >= 1, got {value}")
        if int(every_n_steps) < 0:
            raise ValueError(f"{key_prefix}every_n_steps must be >= 0 (0 = at every validation), got {every_n_steps}")
        self.metric_names = list(metrics)
        self.n_images, self.every_n_steps, self.batch_size = int(n_images), int(every_n_steps), int(batch_size)
        self.inception_weights, self.clip_model = inception_weights, clip_model
        self.sampler = SamplingOptions.of(sampler, key=f"{key_prefix}sampler")  # the whole ${sampler} node
        self.guidance_scale, self.seed = guidance_scale, int(seed)
        self.use_ema, self.kid_subset_size, self.key_prefix = use_ema, int(kid_subset_size), key_prefix
        self.image_metrics: ImageMetrics | None = None
        self.items: EvalItems | None = None
        self.warnings: list[str] = []  # what was reported at setup (on every rank; logged on rank 0)
        self.last_values: dict[str, float] = {}
        self._next_step = self.every_n_steps
        self._checked = False

    # ------------------------------------------------------------------------------------------------------ setup
    def warn(self, trainer: L.Trainer, message: str) -> None:
        self.warnings.append(message)
        if trainer.is_global_zero:
            log.warning("metrics callback: %s", message)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before training: pick the evaluation set and load the extractors; report what cannot run, once."""
        if stage != "fit" or self._checked:
            return
        self._checked = True
        dm = trainer.datamodule
        val = getattr(dm, "val_dataset", None) if dm is not None else None
        if val is None:
            self.warn(trainer, f"no validation data, so {', '.join(self.metric_names)} are not computed "
                               "(give the data a val split: data.val or data.val_fraction)")
            return
        if not trainer.limit_val_batches:
            self.warn(trainer, "validation is off (trainer.limit_val_batches=0) and these metrics are computed at "
                               "validation time, so they are not computed")
            return
        items = first_items(val, self.n_images)
        world = trainer.world_size
        keep = len(items) // world * world
        if keep < 1:
            self.warn(trainer, f"the validation set has {len(items)} items, fewer than the {world} processes; "
                               "no metrics are computed")
            return
        self.items = items.truncated(keep)
        self.image_metrics = build_image_metrics(
            self.metric_names, inception_weights=self.inception_weights, clip_model=self.clip_model,
            key_prefix=self.key_prefix, n_images=keep, kid_subset_size=self.kid_subset_size,
            checker=prompt_checker(val), kid_seed=self.seed, real_images=self.items.has_images)
        for names, reason in self.image_metrics.skipped_groups():
            self.warn(trainer, f"{' and '.join(names)} skipped: {reason}")
        if self.image_metrics and trainer.is_global_zero:
            log.info("metrics callback: %s on %d validation prompts", ", ".join(self.image_metrics.metrics), keep)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.image_metrics:  # outside inference mode, once the strategy has placed the model
            self.image_metrics.to(pl_module.device)

    # --------------------------------------------------------------------------------------------- at validation
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.image_metrics or trainer.global_step < self._next_step:
            return
        step = trainer.global_step
        self._next_step = (step // self.every_n_steps + 1) * self.every_n_steps if self.every_n_steps else step + 1
        values = self.compute(trainer, pl_module)
        pl_module.log_dict({f"val/{k}": v for k, v in values.items()}, batch_size=1)
        self.last_values = values

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The metrics over all processes (every rank must call it)."""
        resolution = self.items.resolution[0] if self.items.resolution else data_resolution(trainer)

        def sample(prompts: list[str], seed: int):
            return generate(pl_module, prompts, sampler=self.sampler, guidance_scale=self.guidance_scale, seed=seed,
                            use_ema=self.use_ema, resolution=resolution)

        return score_share(self.image_metrics, self.items, sample, rank=trainer.global_rank,
                           world_size=trainer.world_size, batch_size=self.batch_size, seed=self.seed)
