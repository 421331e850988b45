"""Image metrics of generated samples as torchmetrics objects: FID and KID against validation images, CLIP score
against the prompts, and prompt accuracy (with the checker a dataset offers, e.g. the shapes task's).

Each process updates them with its own share of the images; ``compute()`` reduces the states across processes
(torchmetrics' built-in sync, whenever ``torch.distributed`` is initialised), so every rank gets the value of the
whole set. A metric whose feature extractor is missing is left out and its reason kept in ``skipped``.

Images are (B, 3, H, W) float tensors in [-1, 1], as the pipelines and datasets give them.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ldm.evaluation.extractors import MissingExtractorError, load_clip, load_inception

METRIC_NAMES = ("fid", "kid", "clip_score", "prompt_accuracy")
NEEDS_REAL = ("fid", "kid")


def to_unit_range(images: Tensor) -> Tensor:
    """[-1, 1] -> float [0, 1] (what the FID / KID extractors take)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] -> uint8 [0, 255] (what CLIP's image processor takes)."""
    return (to_unit_range(images) * 255).round().to(torch.uint8)


class SharedFeatures(nn.Module):
    """FID and KID share one extractor: the features of a batch are computed once when both metrics get the same
    tensor in a row (``clear()`` after each update drops the held batch)."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        if hasattr(extractor, "num_features"):
            self.num_features = extractor.num_features
        self._last: tuple[Tensor, Tensor] | None = None

    def forward(self, images: Tensor) -> Tensor:
        if self._last is None or self._last[0] is not images:
            self._last = (images, self.extractor(images))
        return self._last[1]

    def clear(self) -> None:
        self._last = None


def _concat_feature_lists(kid: Metric) -> None:
    """KID keeps its features as lists that the sync gathers element by element (rank 0's first batch, rank 1's
    first batch, ...). One tensor per process instead makes the gathered order rank 0's images then rank 1's, the
    order of one process doing it all, so its random subsets, hence the value, do not depend on the process count
    (and every rank makes the same number of gathers)."""
    for state in ("real_features", "fake_features"):
        features = getattr(kid, state)
        if isinstance(features, list) and len(features) > 1:
            setattr(kid, state, [torch.cat(features)])


def group_by_reason(skipped: dict[str, str]) -> list[tuple[list[str], str]]:
    groups: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        groups.setdefault(reason, []).append(name)
    return [(names, reason) for reason, names in groups.items()]


class PromptAccuracy(Metric):
    """Fraction of images that show what their caption says, per aspect, as read back by a prompt checker.

    The checker comes with the data (a dataset's ``checker()``, see ``eval_set.prompt_checker``; the shapes task's
    ``ShapesChecker`` is one): ``checker.aspects`` names what it reads back (("color", "shape")), and
    ``checker.hits(images, captions)`` counts per aspect the images that match their caption. ``compute()`` gives
    ``prompt_<aspect>_acc`` for each aspect.
    """

    full_state_update = False

    def __init__(self, checker, **kwargs: Any):
        super().__init__(**kwargs)
        aspects = tuple(getattr(checker, "aspects", ()))
        if not aspects or not callable(getattr(checker, "hits", None)):
            raise TypeError(f"prompt accuracy needs a checker with `aspects` and `hits(images, captions)`, got "
                            f"{type(checker).__name__}")
        self.checker, self.aspects = checker, aspects
        for name in (*(f"{a}_hits" for a in aspects), "n"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        hits = self.checker.hits(images.detach().float().cpu(), list(prompts))
        for aspect in self.aspects:
            setattr(self, f"{aspect}_hits", getattr(self, f"{aspect}_hits") + int(hits[aspect]))
        self.n += len(prompts)

    def compute(self) -> dict[str, Tensor]:
        n = self.n.clamp(min=1).double()
        return {f"prompt_{a}_acc": getattr(self, f"{a}_hits") / n for a in self.aspects}


class ImageMetrics:
    """The configured metrics (``metrics``: name -> torchmetrics Metric) and why others were left out
    (``skipped``: name -> message). FID / KID keep the real images' features across ``reset()``, so the
    validation images are read once per run; ``kid_seed`` makes KID's random subsets the same on every rank and
    leaves the global RNG untouched."""

    def __init__(self, metrics: dict[str, Metric], skipped: dict[str, str] | None = None, kid_seed: int = 0):
        self.metrics, self.skipped, self.kid_seed = metrics, dict(skipped or {}), kid_seed
        self.has_real = False

    def __bool__(self) -> bool:
        return bool(self.metrics)

    def skipped_groups(self) -> list[tuple[list[str], str]]:
        """Skipped metrics grouped by reason (FID and KID share theirs), to report each reason once."""
        return group_by_reason(self.skipped)

    @property
    def needs_real(self) -> bool:
        """True until the real images were given (only FID / KID use them)."""
        return not self.has_real and any(name in self.metrics for name in NEEDS_REAL)

    def to(self, device) -> "ImageMetrics":
        for metric in self.metrics.values():
            metric.to(device)
        return self

    def _update_features(self, images: Tensor, real: bool) -> None:
        present = [self.metrics[name] for name in NEEDS_REAL if name in self.metrics]
        if not present:
            return
        x = to_unit_range(images).to(present[0].device)  # one tensor for both: SharedFeatures computes once
        for metric in present:
            metric.update(x, real=real)
        if isinstance(present[0].inception, SharedFeatures):
            present[0].inception.clear()

    @torch.no_grad()
    def update_real(self, images: Tensor) -> None:
        self._update_features(images, real=True)

    def mark_real_done(self) -> None:
        self.has_real = True

    @torch.no_grad()
    def update_generated(self, images: Tensor, prompts: Sequence[str]) -> None:
        self._update_features(images, real=False)
        for name, metric in self.metrics.items():
            if name == "clip_score":
                metric.update(to_uint8(images).to(metric.device), list(prompts))
            elif name == "prompt_accuracy":
                metric.update(images, prompts)

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """The values over all processes (collective: every rank must call it), then ``reset()``."""
        values: dict[str, float] = {}
        for name, metric in self.metrics.items():
            if name == "kid":
                _concat_feature_lists(metric)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.kid_seed)
                    mean, std = metric.compute()
                values.update(kid=float(mean), kid_std=float(std))
            elif name == "prompt_accuracy":
                values.update({k: float(v) for k, v in metric.compute().items()})
            else:
                values[name] = float(metric.compute())
        self.reset()
        return values

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


def build_image_metrics(names: Sequence[str], *, inception_weights=None, clip_model=None, key_prefix: str = "",
                        n_images: int | None = None, kid_subset_size: int = 100, kid_subsets: int = 100,
                        feature_extractor: nn.Module | None = None, checker=None, kid_seed: int = 0,
                        real_images: bool = True) -> ImageMetrics:
    """The metrics ``names`` (from METRIC_NAMES). Missing extractor files never raise: the metric goes to
    ``skipped`` with a message naming the file and the config key (``key_prefix`` + ``inception_weights`` /
    ``clip_model``).

    feature_extractor: an nn.Module (images in [0, 1] -> (B, D) features) used for FID / KID instead of the
    Inception weights (tests, custom extractors). checker: the data's prompt checker (``eval_set.prompt_checker``;
    see :class:`PromptAccuracy`); without one prompt accuracy is skipped. n_images: the size of the evaluation set
    (FID / KID need 2; KID's subsets are at most this big).
    real_images: False when the validation data has no pixels (a latent cache): FID / KID are skipped.
    """
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    metrics: dict[str, Metric] = {}
    skipped: dict[str, str] = {}
    wanted = list(dict.fromkeys(names))
    if any(n in NEEDS_REAL for n in wanted):
        extractor, reason = feature_extractor, None
        if not real_images:
            reason = ("FID and KID compare pixels, but the validation items have no 'image' (cached latents); "
                      "evaluate with the image data the cache was made from")
        elif n_images is not None and n_images < 2:
            reason = f"FID and KID need at least 2 images, the evaluation set has {n_images}"
        elif extractor is None:
            try:
                extractor = load_inception(inception_weights, f"{key_prefix}inception_weights")
            except MissingExtractorError as err:
                reason = str(err)
        if extractor is not None:
            extractor = SharedFeatures(extractor)
        for name in (n for n in wanted if n in NEEDS_REAL):
            if reason is not None:
                skipped[name] = reason
            elif name == "fid":
                from torchmetrics.image.fid import FrechetInceptionDistance

                metrics[name] = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
            else:
                from torchmetrics.image.kid import KernelInceptionDistance

                size = min(kid_subset_size, n_images) if n_images is not None else kid_subset_size
                with warnings.catch_warnings():  # "will save all extracted features": n_images of them, by design
                    warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                    metrics[name] = KernelInceptionDistance(feature=extractor, subsets=kid_subsets, subset_size=size,
                                                            reset_real_features=False)
    if "clip_score" in wanted:
        try:
            model, processor = load_clip(clip_model, f"{key_prefix}clip_model")
            from torchmetrics.multimodal.clip_score import CLIPScore

            metrics["clip_score"] = CLIPScore(model_name_or_path=lambda: (model, processor))
        except MissingExtractorError as err:
            skipped["clip_score"] = str(err)
    if "prompt_accuracy" in wanted:
        if checker is None:
            skipped["prompt_accuracy"] = ("prompt accuracy reads the caption back from the image with a checker "
                                          "that the validation dataset offers (its checker(): the synthetic shapes, "
                                          "data=shapes, have one); this data has none")
        else:
            metrics["prompt_accuracy"] = PromptAccuracy(checker)
    order = {n: i for i, n in enumerate(wanted)}
    return ImageMetrics(dict(sorted(metrics.items(), key=lambda kv: order[kv[0]])), skipped, kid_seed)


def score_share(metrics: ImageMetrics, items, generate, *, rank: int = 0, world_size: int = 1, batch_size: int = 16,
                seed: int = 0) -> dict[str, float]:
    """Generate this process's share of ``items`` (an :class:`~ldm.evaluation.eval_set.EvalItems`), update the
    metrics with it (and, the first time, with the share's real images), and return the values over all
    processes. Every rank must call it (``compute`` is collective)."""
    from ldm.evaluation.eval_set import generate_share, share

    indices = share(len(items), rank, world_size)
    if metrics.needs_real and items.has_images:
        for start in range(indices.start, indices.stop, batch_size):
            metrics.update_real(items.images(start, min(start + batch_size, indices.stop)))
        metrics.mark_real_done()
    for prompts, images in generate_share(generate, items.captions, indices, batch_size, seed):
        metrics.update_generated(images, prompts)
    return metrics.compute()
