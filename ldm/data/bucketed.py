"""What an image source does with aspect-ratio buckets (`ldm.data.buckets`): assign every image its bucket from
its size, and cut a loaded image (and its companion, a ControlNet control image, alike) to the bucket of the index
that was asked for, or to the square without buckets."""

from __future__ import annotations

import logging

from PIL import Image

from ldm.data.buckets import BucketAssignment, BucketSettings, assign_buckets, center_crop_record, cover_size
from ldm.data.transforms import ImageTransform, at_size, pil_to_tensor, to_rgb

logger = logging.getLogger("ldm.data")


def buckets_enabled(buckets) -> bool:
    """Whether a source's ``buckets`` setting (None, a mapping, `BucketSettings`) turns buckets on; an invalid
    one raises the error naming its key."""
    return BucketSettings.of(buckets).enabled


def assign_source_buckets(buckets, sizes: list[tuple[int, int] | None], resolution: int,
                          name: str) -> BucketAssignment | None:
    """The assignment of a source's images (None: buckets disabled). An image whose size cannot be read is given
    the square bucket; it is skipped when loaded and the next readable image is cropped to that bucket."""
    settings = BucketSettings.of(buckets)
    if not settings.enabled:
        return None
    known = [s or (resolution, resolution) for s in sizes]
    assignment = assign_buckets(known, resolution, settings)
    logger.info("%s: %d aspect-ratio bucket(s) at max area %d x %d:\n%s", name, len(assignment.buckets),
                resolution, resolution, assignment.describe())
    return assignment


def cut_sample(transform: ImageTransform, assignment: BucketAssignment | None, image: Image.Image, slot: int,
               loaded: int, companion: Image.Image | None = None) -> dict:
    """``image`` (of index ``loaded``) cut for index ``slot`` (another index when ``slot`` was unreadable):
    {"image"}, with buckets cropped to the bucket of ``slot`` with its record ("original_size", "crop_top_left",
    "target_size"), else the transform's square. ``companion`` (an image that belongs to this one: a ControlNet
    pair's control image) is brought to the image's size and cut with the same `Cut` (the same resize, crop and
    flip), under "companion" (3, h, w) in [-1, 1]."""
    image = to_rgb(image)
    if assignment is None:
        cut = transform.draw(image.size)
    else:
        bucket = assignment.target(slot)
        resized = assignment.resized[slot] if slot == loaded else cover_size(*image.size, bucket)
        cut = transform.draw(image.size, bucket, resized)
    sample = {"image": pil_to_tensor(cut(image))}
    if assignment is not None:
        sample.update(cut.record(image.size))
    if companion is not None:
        sample["companion"] = pil_to_tensor(cut(at_size(to_rgb(companion), image.size)))
    return sample


def cache_records(assignment: BucketAssignment, flip: bool) -> list[list[dict]]:
    """Per image, the records of its cached variants (centre crop; mirrored too when ``flip``)."""
    variants = (False, True) if flip else (False,)
    return [[center_crop_record(*assignment.sizes[i], assignment.resized[i], assignment.target(i), f)
             for f in variants] for i in range(len(assignment.bucket_of))]
