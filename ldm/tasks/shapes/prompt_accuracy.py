"""The shapes task's end-of-training check (``callbacks.prompt_accuracy``, configs/callbacks/default.yaml): does a
sample of "a blue triangle ..." show a blue triangle? Scored with the shapes checker, written to
``<run>/prompt_accuracy.json`` and ``<run>/prompt_accuracy_cfg.png``."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from ldm.pipelines.images import labelled_grid, to_pil
from ldm.pipelines.sampling_options import SamplingOptions
from ldm.tasks.shapes.checker import prompt_accuracy
from ldm.tasks.shapes.dataset import ShapesDataset
from ldm.training.callbacks.result import ResultCallback
from ldm.training.callbacks.sampling import TRAINING_SAMPLER, generate, run_dir, runs_the_model, training_source

log = logging.getLogger("ldm.training")


class PromptAccuracyCallback(ResultCallback):
    """At the end of training on the shapes data: does a sample of "a blue triangle ..." show a blue triangle?

    Samples every colour x shape prompt ``n_per_prompt`` times with CFG (``guidance_scale``), with CFG off
    (scale 1, the plain conditional model) and unconditionally (empty prompt), scores them with the shapes
    checker, logs the accuracies, prints them and writes ``<run>/prompt_accuracy.json``. ``sampler`` as in
    :class:`ldm.training.callbacks.sampling.SamplingCallback`.
    """

    def __init__(self, n_per_prompt: int = 4, guidance_scale: float = 3.0, sampler: Any = TRAINING_SAMPLER,
                 seed: int = 1234, use_ema: bool = True, batch_size: int = 64):
        self.n_per_prompt, self.guidance_scale = n_per_prompt, guidance_scale
        self.sampler = SamplingOptions.of(sampler, key="callbacks.prompt_accuracy.sampler")
        self.seed, self.use_ema, self.batch_size = seed, use_ema, batch_size
        self.results: dict[str, Any] | None = None

    @staticmethod
    def shapes_dataset(trainer):
        ds = training_source(trainer)
        return ds if isinstance(ds, ShapesDataset) else None

    def on_train_end(self, trainer, pl_module) -> None:
        ds = self.shapes_dataset(trainer)
        if ds is None:
            log.info("prompt accuracy: skipped (the training data is not the synthetic shapes)")
            return
        if trainer.is_global_zero:
            self.results = self.evaluate(pl_module, ds, trainer)
        elif runs_the_model(trainer, pl_module):  # trainer=fsdp2: the same sampling on every rank, in lockstep
            self.evaluate(pl_module, ds)

    def result(self) -> dict[str, Any]:
        return {"prompt_accuracy": self.results} if self.results else {}

    def prompts(self, ds) -> list[str]:
        """Every colour x shape pair, ``n_per_prompt`` times; the repeats cycle through the colour's
        backgrounds (starting at a different one for each pair), so every background is exercised."""
        prompts = []
        for i, (color, shape) in enumerate((c, s) for c in ds.colors for s in ds.shapes):
            backgrounds = ds.backgrounds_for(color)
            prompts += [ds.template.format(color=color, shape=shape, background=backgrounds[(i + r) % len(backgrounds)])
                        for r in range(self.n_per_prompt)]
        return prompts

    def evaluate(self, pl_module, ds, trainer=None) -> dict[str, Any]:
        prompts = self.prompts(ds)
        checker = ds.checker()
        results: dict[str, Any] = {"n": len(prompts), "guidance_scale": self.guidance_scale,
                                   **self.sampler.record()}
        settings = {"cfg": (self.guidance_scale, False), "no_cfg": (1.0, False), "uncond": (1.0, True)}
        for name, (scale, uncond) in settings.items():
            images = []
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start:start + self.batch_size]
                images.append(generate(pl_module, [""] * len(chunk) if uncond else chunk, sampler=self.sampler,
                                       guidance_scale=scale, seed=self.seed + start,
                                       use_ema=self.use_ema, resolution=ds.resolution))
            acc = prompt_accuracy(torch.cat(images), prompts, checker)
            results[name] = {"color_acc": acc["color_acc"], "shape_acc": acc["shape_acc"]}
            if name == "cfg" and trainer is not None:
                out = run_dir(trainer) / "prompt_accuracy_cfg.png"
                labelled_grid(to_pil(torch.cat(images)[:: self.n_per_prompt]), labels=prompts[:: self.n_per_prompt],
                              ncol=len(ds.shapes), scale=max(1, 96 // ds.resolution)).save(out)
                results["grid"] = out.name  # beside prompt_accuracy.json in the run folder: no absolute path
        if trainer is not None:
            metrics = {f"prompt_accuracy/{k}_{m}": v[m] for k, v in results.items() if isinstance(v, dict)
                       for m in ("color_acc", "shape_acc")}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
            path = run_dir(trainer) / "prompt_accuracy.json"
            path.write_text(json.dumps(results, indent=2))
            results["path"] = str(path)
        print("prompt accuracy (shapes checker):")
        for name in settings:
            r = results[name]
            print(f"  {name:7s} colour {r['color_acc']:.1%}  shape {r['shape_acc']:.1%}")
        return results
