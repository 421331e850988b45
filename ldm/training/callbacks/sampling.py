"""Sample grids while training, and the sampling helpers other callbacks share (``generate``, the training source
and resolution). (A task's own callbacks live with the task: the shapes prompt accuracy is
ldm.tasks.shapes.prompt_accuracy.)"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ldm.pipelines.images import labelled_grid, to_pil
from ldm.pipelines.prompt_file import PromptFileError, check_sizes, read_prompt_file, sampler_for, settings_label
from ldm.pipelines.sampling_options import SamplingOptions
from ldm.training.callbacks.result import ResultCallback

log = logging.getLogger("ldm.training")

# The callbacks' sampler when none is given (configs/callbacks/ pass the run's ``${sampler}`` node instead).
TRAINING_SAMPLER = SamplingOptions(name="ddim", steps=25)


def run_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def log_image(trainer: L.Trainer, key: str, path: Path, step: int) -> None:
    """Send an image file to every logger that takes images (TensorBoard, wandb); CSV keeps the file path."""
    from PIL import Image
    import numpy as np

    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "TensorBoardLogger":
            arr = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, arr, step, dataformats="HWC")
        elif name == "WandbLogger":
            logger.log_image(key=key, images=[str(path)], step=step)


def generate(pl_module, prompts: list[str], *, sampler: SamplingOptions, guidance_scale: float, seed: int,
             use_ema: bool = True, resolution: int | tuple[int, int] | None = None,
             negative_prompt: str | None = None, control_images: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for the prompts, through the same pipeline as sample.py, with every
    setting of the ``sampler`` node (steps, eta, karras, spacing, ...). ``resolution``: a side, or (height,
    width). ``control_images`` (B, C, H, W) in [0, 1]: what the trained part samples with them (a ControlNet's
    control; nothing for other parts)."""
    from ldm.pipelines import text_to_image

    height, width = resolution if isinstance(resolution, (tuple, list)) else (resolution, resolution)
    control = pl_module.sampling_controls(control_images, use_ema) if control_images is not None else None
    with pl_module.sampling_bundle(use_ema=use_ema) as bundle:  # with an adapter: the (EMA) adapter applied
        was_training = bundle.unet.training
        bundle.unet.eval()
        try:
            return text_to_image(bundle, prompts, sampler=sampler, guidance_scale=guidance_scale, seed=seed,
                                 height=height, width=width, negative_prompt=negative_prompt, control=control)
        finally:
            bundle.unet.train(was_training)


def generate_each(pl_module, prompts: list[str], options: list[dict[str, Any]]) -> list[torch.Tensor]:
    """One image (3, H, W) per prompt with its own `generate` options (resolution, sampler, guidance_scale, seed,
    negative_prompt, use_ema): prompts whose options are equal share one call. In the prompts' order."""
    groups: dict[str, list[int]] = {}
    for i, opts in enumerate(options):
        groups.setdefault(repr(sorted(opts.items())), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for chosen in groups.values():
        images = generate(pl_module, [prompts[i] for i in chosen], **options[chosen[0]])
        for i, image in zip(chosen, images):
            out[i] = image
    return out


def generate_at_sizes(pl_module, prompts: list[str], sizes: list[tuple[int, int]],
                      control_images: list[torch.Tensor] | None = None, **options) -> list[torch.Tensor]:
    """One image (3, H, W) per prompt at its own (height, width): one `generate` call per size (seeded alike), in
    the prompts' order; how samples of bucketed data are drawn at each caption's bucket size. ``control_images``:
    one (C, H, W) per prompt at its size (a ControlNet's controls of bucketed pairs)."""
    if control_images is None:
        return generate_each(pl_module, prompts, [dict(options, resolution=size) for size in sizes])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for size, chosen in groups.items():
        images = generate(pl_module, [prompts[i] for i in chosen], resolution=size,
                          control_images=torch.stack([control_images[i] for i in chosen]), **options)
        for i, image in zip(chosen, images):
            out[i] = image
    return out


def runs_the_model(trainer: L.Trainer, pl_module) -> bool:
    """Whether this rank runs the model for what rank 0 alone reports (sample grids, evaluations): rank 0; under
    trainer=fsdp2 every rank, in lockstep (the sharded weights are all-gathered block by block, a collective that
    every rank must join; rank 0 alone would wait forever), rank 0 alone keeping the result."""
    from ldm.training.module.sharded.fsdp2 import is_sharded

    return rank_zero_only.rank == 0 or is_sharded(pl_module)


def training_source(trainer: L.Trainer):
    """The training images' dataset: the one a latent cache was encoded from, else the training dataset
    (unwrapped from a Subset); None without a datamodule."""
    dm = trainer.datamodule
    if dm is None:
        return None
    from ldm.evaluation.eval_set import base_dataset

    return base_dataset(getattr(dm, "source_dataset", None) or getattr(dm, "train_dataset", None))


def data_resolution(trainer: L.Trainer) -> int | None:
    """The training resolution train(cfg) recorded in the model config, else the training source's."""
    recorded = (getattr(trainer.lightning_module, "model_config", None) or {}).get("resolution")
    return recorded or getattr(training_source(trainer), "resolution", None)


class SamplingCallback(ResultCallback):
    """Every ``every_n_steps`` optimizer steps (and at the end) sample prompts with a fixed seed, write a labelled
    PNG grid to ``<run>/samples/step_XXXXXX.png`` and send it to the loggers.

    The prompts are those of ``prompt_file`` when given (kohya's sample-prompt format, each prompt with its own
    size, steps, seed, guidance, negative prompt and sampler: ``ldm.pipelines.prompt_file``; each grid cell is
    labelled with its prompt and settings), else ``prompts``; otherwise the captions of ``n_prompts`` validation
    items drawn with ``seed`` (training items when the data has no validation split), and the grid shows each
    item's real image beside its sample. Samples are drawn at ``resolution`` (a side, or [height, width]); else,
    with aspect-ratio buckets, each caption at its own image's bucket size; else at the training data's
    resolution, else at the real images' size.
    ``sampler``: the whole ``sampler`` config node (``${sampler}``: name, steps, eta, karras, spacing, ...), a
    :class:`SamplingOptions` or a sampler name."""

    def __init__(self, prompts: list[str] | None = None, every_n_steps: int = 400, sampler: Any = TRAINING_SAMPLER,
                 guidance_scale: float = 3.0, seed: int = 0, use_ema: bool = True,
                 resolution: int | list[int] | None = None, at_end: bool = True, n_prompts: int = 8,
                 prompt_file: str | None = None):
        # read (and checked) when the run starts; what the model decides (sizes, steps) is checked at fit start
        self.file_prompts = read_prompt_file(prompt_file) if prompt_file is not None else None
        if self.file_prompts is not None:  # in place of an experiment's prompts
            prompts = [p.prompt for p in self.file_prompts]
        if prompts is not None and len(prompts) == 0:
            raise ValueError("callbacks.sampling.prompts must list at least one prompt (or be null: captions of "
                             "the validation data)")
        if prompts is None and int(n_prompts) <= 0:
            raise ValueError(f"callbacks.sampling.n_prompts must be positive, got {n_prompts}")
        self.prompts = list(prompts) if prompts is not None else None
        self.n_prompts, self.every_n_steps = int(n_prompts), int(every_n_steps)
        self.sampler = SamplingOptions.of(sampler, key="callbacks.sampling.sampler")
        self.guidance_scale, self.seed = guidance_scale, seed
        if resolution is not None and not isinstance(resolution, int):
            resolution = tuple(int(v) for v in resolution)
            if len(resolution) != 2:
                raise ValueError(f"callbacks.sampling.resolution must be a side or [height, width], got {list(resolution)}")
        self.use_ema, self.resolution, self.at_end = use_ema, resolution, at_end
        # beside the samples, when the prompts came from the data: a (B, 3, H, W) tensor, or a list of (3, h, w)
        # images of their own sizes (aspect-ratio buckets)
        self.real_images: torch.Tensor | list[torch.Tensor] | None = None
        # (B, C, H, W) in [0, 1]: the items' ControlNet controls (a list of (C, H, W) at their bucket sizes)
        self.control_images: torch.Tensor | list[torch.Tensor] | None = None
        self.last_path: Path | None = None
        self._last_step = -1
        self._file_runs: list[tuple[dict[str, Any], str]] | None = None  # prompt_file: (generate options, label)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.file_prompts is not None:
            self._file_runs = self.prompt_file_runs(trainer, pl_module)
        if self.prompts is None:
            self.prompts, self.real_images, self.control_images = data_prompts(trainer, self.n_prompts, self.seed)
            log.info("sampling callback: %d captions drawn from the %s data", len(self.prompts),
                     "validation" if validation_items(trainer) is not None else "training")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.sample_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.sample_grid(trainer, pl_module)

    @staticmethod
    def grid_scale(images) -> int:
        """Small samples are enlarged (nearest) so that the grid's labels fit under them."""
        return max(1, 96 // max(int(im.shape[-1]) for im in images))

    def sample_resolution(self, trainer) -> int | tuple[int, int] | None:
        if self.resolution or data_resolution(trainer):
            return self.resolution or data_resolution(trainer)
        return int(self.real_images.shape[-1]) if self.real_images is not None else None

    def sample_sizes(self, trainer) -> list[tuple[int, int]] | None:
        """Each prompt's (height, width) when they differ: the real images' (bucket) sizes unless ``resolution``
        is set; None: one size for all."""
        if self.resolution or not isinstance(self.real_images, list):
            return None
        return [(int(im.shape[-2]), int(im.shape[-1])) for im in self.real_images]

    def prompt_file_runs(self, trainer, pl_module) -> list[tuple[dict[str, Any], str]]:
        """Each prompt of the prompt file: its `generate` options (the callback's settings where its line gives
        none) and its grid label; checked against the model (sizes, steps) before anything trains."""
        default = self.sample_resolution(trainer)
        default_hw = tuple(default) if isinstance(default, (tuple, list)) else (default, default)
        f = int(getattr(pl_module.autoencoder, "downsample_factor", 1))
        check_sizes(self.file_prompts, f * int(getattr(pl_module.unet, "downsample_factor", 1)))
        runs = []
        for p in self.file_prompts:
            height, width = p.height or default_hw[0], p.width or default_hw[1]
            if height is None or width is None:
                raise PromptFileError(f"{p.where}: no --w/--h and the training resolution is unknown; give them, "
                                      "or set callbacks.sampling.resolution")
            sampler = sampler_for(p, self.sampler)
            try:
                sampler.timesteps(pl_module.schedule)  # steps past the model's timesteps
            except ValueError as err:
                raise PromptFileError(f"{p.where}: {err}") from None
            guidance = self.guidance_scale if p.guidance_scale is None else p.guidance_scale
            seed = self.seed if p.seed is None else p.seed
            label = "\n".join([p.prompt, settings_label(width, height, sampler.steps, guidance, seed, sampler.name)]
                              + ([f"neg: {p.negative_prompt}"] if p.negative_prompt else []))
            runs.append((dict(resolution=(height, width), sampler=sampler, guidance_scale=guidance, seed=seed,
                              negative_prompt=p.negative_prompt, use_ema=self.use_ema), label))
        return runs

    def sample_images(self, trainer, pl_module) -> tuple[list, list[str], list[torch.Tensor]]:
        """The grid's cells (PIL images), their labels, and the samples: the prompt file's prompts each with its
        settings, or the prompts at one size (or their buckets'), beside their real images when drawn from data."""
        if self.file_prompts is not None:
            if self._file_runs is None:  # sampling before fit (a test, a script)
                self._file_runs = self.prompt_file_runs(trainer, pl_module)
            images = generate_each(pl_module, self.prompts, [options for options, _ in self._file_runs])
            return [to_pil(im[None])[0] for im in images], [label for _, label in self._file_runs], images
        options = dict(sampler=self.sampler, guidance_scale=self.guidance_scale, seed=self.seed, use_ema=self.use_ema)
        sizes = self.sample_sizes(trainer)
        if sizes is not None:
            controls = None if self.control_images is None else list(self.control_images)
            images = generate_at_sizes(pl_module, self.prompts, sizes, control_images=controls, **options)
        else:
            images = generate(pl_module, self.prompts, resolution=self.sample_resolution(trainer),
                              control_images=self.control_images, **options)
        pils, labels = [to_pil(im[None])[0] for im in images], list(self.prompts)
        real = self.real_images
        if real is not None and [tuple(r.shape[-2:]) for r in real] == [tuple(im.shape[-2:]) for im in images]:
            # (real, sample) pairs side by side: the caption under the sample, "real" under the image; with
            # ControlNet controls: control | sample | real
            controls = ([to_pil(c.expand(3, -1, -1)[None] * 2 - 1)[0] for c in self.control_images]
                        if self.control_images is not None else None)
            cells = zip(controls, pils, [to_pil(r[None])[0] for r in real]) if controls else \
                zip([to_pil(r[None])[0] for r in real], pils)
            pils = [im for cell in cells for im in cell]
            names = ("control", "{}", "real") if controls else ("real", "{}")
            labels = [t.format(caption) for caption in self.prompts for t in names]
        return pils, labels, images

    def sample_grid(self, trainer, pl_module) -> Path | None:
        """Rank 0 samples the grid and writes it (under trainer=fsdp2 every rank samples it, see runs_the_model)."""
        if not runs_the_model(trainer, pl_module):
            return None
        if self.prompts is None:  # sampling before fit (a test, a script)
            self.on_fit_start(trainer, pl_module)
        step = trainer.global_step
        self._last_step = step
        pils, labels, images = self.sample_images(trainer, pl_module)
        if rank_zero_only.rank != 0:
            return None
        out = run_dir(trainer) / "samples" / f"step_{step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        per_prompt = len(pils) // len(images)  # 1, 2 (real beside) or 3 (control | sample | real)
        ncol = per_prompt * max(1, round(len(self.prompts) ** 0.5)) if per_prompt > 1 else None
        labelled_grid(pils, labels=labels, ncol=ncol, scale=self.grid_scale(images)).save(out)
        log_image(trainer, "samples", out, step)
        self.last_path = out
        return out

    def result(self) -> dict[str, Any]:
        return {"sample_grid": str(self.last_path)} if self.last_path else {}


def validation_items(trainer: L.Trainer):
    """The datamodule's validation dataset (after setup), or None."""
    dm = trainer.datamodule
    if dm is None:
        return None
    dm.setup("fit")
    return getattr(dm, "val_dataset", None)


def data_prompts(trainer: L.Trainer, n: int, seed: int):
    """Captions of ``n`` items drawn with ``seed`` from the validation data (else the training data), their
    images (None when the items are cached latents without images) and their ControlNet control images (None
    when the items have none)."""
    from ldm.evaluation.eval_set import sample_items

    dataset = validation_items(trainer)
    if dataset is None or (hasattr(dataset, "__len__") and len(dataset) == 0):
        dataset = training_source(trainer)
    if dataset is None:
        raise ValueError("callbacks.sampling: no prompts given and no data to draw captions from; set "
                         "callbacks.sampling.prompts")
    items = sample_items(dataset, n, seed)
    if not items:
        raise ValueError("callbacks.sampling: the data has no items to draw captions from; set "
                         "callbacks.sampling.prompts")
    images = [it.get("image") for it in items]
    real = None
    if all(isinstance(im, torch.Tensor) for im in images):
        same = len({tuple(im.shape) for im in images}) == 1
        real = torch.stack(images).float() if same else [im.float() for im in images]  # buckets: their own sizes
    controls = [it.get("conditioning_image") for it in items]
    control = None
    if all(isinstance(c, torch.Tensor) for c in controls):
        same = len({tuple(c.shape) for c in controls}) == 1
        control = torch.stack(controls).float() if same else [c.float() for c in controls]  # buckets: their sizes
    return [str(it["caption"]) for it in items], real, control
