"""Aspect-ratio buckets (kohya's scheme): a table of (width, height) buckets and each image's bucket.

Pure functions of image sizes and settings (no I/O, no torch), after kohya-ss/sd-scripts:

- `bucket_table` follows ``library/model_util.py: make_bucket_resolutions``: with max area A = (R // step)^2 steps^2
  (R = ``resolution``), the square bucket of side floor(sqrt(A)) * step, and for every width w = min_side,
  min_side + step, ..., max_side the bucket (w, h) and its transpose (h, w), h = min(max_side, (A // (w // step)) *
  step): the largest multiple of step with w * h <= A * step^2. Unlike kohya's, buckets whose short side falls
  below min_side are left out (kohya keeps them when max_side * min_side < R^2).
- `select_bucket` follows ``library/train_util.py: BucketManager.select_bucket``: the bucket whose aspect ratio
  w / h is nearest the image's (the first one of the sorted table on a tie); the image is resized to cover it,
  matching the bucket's height when the bucket is narrower than the image (else its width), rounded half up,
  then cropped to it.
- ``no_upscale``: kohya's per-image buckets (``select_bucket`` with ``no_upscale``): an image within the max area
  keeps its size, a larger one is scaled down to the max area keeping its aspect ratio (the rounding of width or
  height to the step that keeps the aspect ratio better); the bucket is that size rounded down to the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BucketSettings:
    """``data.train.buckets``: enabled, step (px, a multiple of the model's downsampling), min_side / max_side
    (px; null: resolution / 2 and 2 x resolution, kohya's defaults at 512), no_upscale."""

    enabled: bool = False
    step: int | str = "auto"  # resolved by train() from the resolution and the model; else min(64, resolution)
    min_side: int | None = None
    max_side: int | None = None
    no_upscale: bool = False

    @classmethod
    def of(cls, value, key: str = "data.train.buckets") -> "BucketSettings":
        if value is None:
            return cls()
        if isinstance(value, BucketSettings):
            return value
        try:
            items = dict(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a mapping of enabled/step/min_side/max_side/no_upscale, got {value!r}") from None
        unknown = sorted(set(items) - {"enabled", "step", "min_side", "max_side", "no_upscale"})
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {unknown}; valid: enabled, step, min_side, max_side, no_upscale")
        return cls(**items)

    def resolved(self, resolution: int, key: str = "data.train.buckets") -> tuple[int, int, int]:
        """(step, min_side, max_side) checked against ``resolution``, each error naming its key."""
        step = min(64, resolution) if self.step == "auto" else int(self.step)
        if step <= 0:
            raise ValueError(f"{key}.step must be a positive number of pixels, got {self.step!r}")
        min_side = int(self.min_side) if self.min_side is not None else max(step, resolution // 2)
        max_side = int(self.max_side) if self.max_side is not None else 2 * resolution
        if resolution < step:
            raise ValueError(f"{key}.step={step} is larger than data.train.resolution={resolution}: lower the step "
                             f"(a multiple of the model's downsampling)")
        if not step <= min_side <= resolution:
            raise ValueError(f"{key}.min_side={min_side} must be between step ({step}) and data.train.resolution "
                             f"({resolution})")
        if max_side < resolution:
            raise ValueError(f"{key}.max_side={max_side} must be at least data.train.resolution ({resolution})")
        return step, min_side, max_side


Size = tuple[int, int]  # (width, height) in pixels, as kohya and PIL write sizes


def bucket_table(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """The sorted (width, height) buckets of kohya's ``make_bucket_resolutions`` (see the module docstring)."""
    area = (resolution // step) ** 2  # in units of step x step
    side = int(math.sqrt(area)) * step
    buckets = {(side, side)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (area // (width // step)) * step)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def select_bucket(width: int, height: int, table: list[Size]) -> tuple[Size, Size]:
    """(bucket, resized size) of an image of ``width`` x ``height``: kohya's ``BucketManager.select_bucket``."""
    ratio = width / height
    errors = [w / h - ratio for w, h in table]
    best = min(range(len(table)), key=lambda i: abs(errors[i]))  # the first on a tie, like numpy's argmin
    return table[best], cover_size(width, height, table[best])


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """The size an image is resized to so that it covers ``bucket`` with its aspect ratio kept: the bucket's
    height when the bucket is narrower than the image, else its width (kohya's select_bucket), rounded half up."""
    scale = bucket[1] / height if bucket[0] / bucket[1] <= width / height else bucket[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return max(resized[0], bucket[0]), max(resized[1], bucket[1])


def center_crop_record(width: int, height: int, resized: Size, bucket: Size, flipped: bool = False) -> dict:
    """The micro-conditioning record of a centre crop (what ``Cut.record`` of ``ldm.data.transforms`` gives for it)."""
    left, top = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    if flipped:
        left = resized[0] - bucket[0] - left
    return {"original_size": (height, width), "crop_top_left": (top, left), "target_size": (bucket[1], bucket[0])}


def no_upscale_bucket(width: int, height: int, max_area: int, step: int) -> tuple[Size, Size]:
    """(bucket, resized size) with kohya's ``no_upscale``: see the module docstring. A side shorter than one step
    gets a one-step bucket (the image is enlarged to it: a bucket cannot be empty)."""
    ratio = width / height
    if width * height > max_area:
        def round_to_step(x: float) -> int:
            x = int(x + 0.5)
            return x - x % step

        resized_w = math.sqrt(max_area * ratio)
        resized_h = max_area / resized_w
        w_rounded = round_to_step(resized_w)
        h_of_w = round_to_step(w_rounded / ratio)
        h_rounded = round_to_step(resized_h)
        w_of_h = round_to_step(h_rounded * ratio)
        if h_of_w and w_of_h and abs(w_rounded / h_of_w - ratio) < abs(w_of_h / h_rounded - ratio):
            resized = (w_rounded, int(w_rounded / ratio + 0.5))
        else:
            resized = (int(h_rounded * ratio + 0.5), h_rounded)
    else:
        resized = (width, height)
    bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
    if bucket[0] > resized[0] or bucket[1] > resized[1]:  # a side below one step: scale up to cover the bucket
        scale = max(bucket[0] / width, bucket[1] / height)
        resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
    return bucket, resized


@dataclass
class BucketAssignment:
    """Every image's bucket: ``buckets`` the (width, height) of each bucket in use (sorted), ``bucket_of[i]``
    image i's index into it, ``resized[i]`` the size image i is resized to before its crop."""

    buckets: list[Size]
    bucket_of: list[int]
    resized: list[Size]
    table: list[Size] = field(default_factory=list)  # kohya's full table (empty with no_upscale)
    sizes: list[Size] = field(default_factory=list)  # each image's upright (width, height)

    def counts(self) -> list[int]:
        counts = [0] * len(self.buckets)
        for b in self.bucket_of:
            counts[b] += 1
        return counts

    def target(self, i: int) -> Size:
        return self.buckets[self.bucket_of[i]]

    def subset(self, indices) -> "BucketAssignment":
        """The assignment of the images ``indices`` (a Subset of the dataset), with the same buckets."""
        indices = [int(i) for i in indices]
        return BucketAssignment(self.buckets, [self.bucket_of[i] for i in indices],
                                [self.resized[i] for i in indices], self.table, [self.sizes[i] for i in indices])

    def describe(self) -> str:
        """The bucket table as logged at the start: one line per bucket in use, with its number of images."""
        lines = [f"{'bucket (w x h)':>16} {'aspect':>7} {'images':>7}"]
        for (w, h), n in zip(self.buckets, self.counts()):
            lines.append(f"{f'{w} x {h}':>16} {w / h:7.3f} {n:7d}")
        return "\n".join(lines)


def assign_buckets(sizes: list[Size], resolution: int, settings: BucketSettings,
                   key: str = "data.train.buckets") -> BucketAssignment:
    """Each image (its upright (width, height)) to its bucket; the buckets in use are sorted by (w, h)."""
    step, min_side, max_side = settings.resolved(int(resolution), key)
    table = [] if settings.no_upscale else bucket_table(int(resolution), step, min_side, max_side)
    chosen = []
    for width, height in sizes:
        if width <= 0 or height <= 0:
            raise ValueError(f"assign_buckets: image size {width}x{height} is empty")
        if settings.no_upscale:
            chosen.append(no_upscale_bucket(width, height, int(resolution) ** 2, step))
        else:
            chosen.append(select_bucket(width, height, table))
    used = sorted({bucket for bucket, _ in chosen})
    number = {bucket: i for i, bucket in enumerate(used)}
    return BucketAssignment(used, [number[b] for b, _ in chosen], [r for _, r in chosen], table,
                            [(int(w), int(h)) for w, h in sizes])
