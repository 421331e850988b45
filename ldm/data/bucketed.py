"""What an image source does with aspect-ratio buckets (`ldm.data.buckets`): assign every image its bucket from
its size, and crop a loaded image to the bucket of the index that was asked for."""

from __future__ import annotations

import logging

from PIL import Image

from ldm.data.buckets import BucketAssignment, BucketSettings, assign_buckets, center_crop_record, cover_size
from ldm.data.transforms import ImageTransform

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


def bucket_sample(transform: ImageTransform, assignment: BucketAssignment, image: Image.Image, slot: int,
                  loaded: int) -> dict:
    """``image`` (of index ``loaded``) cropped to the bucket of index ``slot`` (another index when ``slot`` was
    unreadable): {"image", "original_size", "crop_top_left", "target_size"}."""
    bucket = assignment.target(slot)
    resized = assignment.resized[slot] if slot == loaded else cover_size(*image.size, bucket)
    tensor, record = transform.to_bucket(image, bucket, resized)
    return {"image": tensor, **record}


def cache_records(assignment: BucketAssignment, flip: bool) -> list[list[dict]]:
    """Per image, the records of its cached variants (centre crop; mirrored too when ``flip``)."""
    variants = (False, True) if flip else (False,)
    return [[center_crop_record(*assignment.sizes[i], assignment.resized[i], assignment.target(i), f)
             for f in variants] for i in range(len(assignment.bucket_of))]
