"""One process of a shared latent-cache build, for tests that run several at once or kill one:

    python -m tests.helpers.cache_builder IMAGES CACHE [--part-size N] [--sleep S] [--go FILE] [--webdataset]

syncs CACHE with the image folder IMAGES (resolution 8; --webdataset: IMAGES is the brace URL of webdataset
shards) through `CountingEncoder` (a 2x2 average pool: fast and deterministic), sleeping S seconds per encoder
call (so processes overlap), after waiting for FILE to exist (so they start together); prints {"encoded": images this process encoded, "calls": encoder calls} as JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("images")
    parser.add_argument("cache")
    parser.add_argument("--part-size", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--go")
    parser.add_argument("--webdataset", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from ldm.data.auto_cache import cache_spec, sync_cache
    from ldm.data.image_folder import ImageFolderDataset
    from tests.helpers.data import CountingEncoder

    counter = CountingEncoder()

    def slow(images, captions, generator=None):
        time.sleep(args.sleep)
        return counter(images, captions, generator)

    if args.webdataset:
        from ldm.data.webdataset import WebDatasetSource

        spec = cache_spec(WebDatasetSource(args.images, resolution=8, shuffle_buffer=0))
    else:
        spec = cache_spec(ImageFolderDataset(args.images, resolution=8))
    while args.go and not Path(args.go).exists():
        time.sleep(0.01)
    view = sync_cache(args.cache, spec, slow, batch_size=2, progress=False, sample=False,
                      part_size=args.part_size, poll_seconds=0.05)
    print(json.dumps({"encoded": view.encoded, "calls": counter.calls}), flush=True)


if __name__ == "__main__":
    main()
