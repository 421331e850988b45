"""Decode + augment throughput (images/s) of each data source, with 0 and 2 DataLoader workers.

Writes its own data into a temporary folder: the same N random-content images (larger than --resolution, so
resize + random crop + flip all run) as a PNG/JPEG image folder with captions, as a Hugging Face dataset saved with
`save_to_disk`, and as webdataset tar shards; the synthetic shapes are rendered on the fly.

    python bench/data.py                       # 256 images of 384x320 -> 256 px, batch 32
    python bench/data.py --sources shapes,folder-jpg --workers 0,2,4
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402

SOURCES = ("shapes", "folder-png", "folder-jpg", "hf", "webdataset")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of {', '.join(SOURCES)}")
    p.add_argument("--workers", default="0,2", help="comma list of DataLoader num_workers")
    p.add_argument("--images", type=int, default=256, help="images per source")
    p.add_argument("--source-size", default="384x320", help="stored image size WxH")
    p.add_argument("--resolution", type=int, default=256, help="output side after resize + crop")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="passes over the data per measurement (first is warm-up "
                                                         "for 0 workers; for >0 the first batch is)")
    p.add_argument("--shards", type=int, default=4, help="webdataset shards")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="")
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    return p.parse_args(argv)


def make_images(n: int, size: tuple[int, int], seed: int = 0):
    """n smooth random-content RGB images (compress like photos more than noise does) with captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((w, h), Image.Resampling.BILINEAR)
        noise = rng.integers(-12, 13, (h, w, 3))
        array = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        yield Image.fromarray(array), f"image {i}: a random smooth pattern"


def encode(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_folder(root: Path, items: list, ext: str) -> Path:
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as meta:
        for i, (data, caption) in enumerate(items):
            (root / f"{i:05d}.{ext}").write_bytes(data)
            meta.write(json.dumps({"file_name": f"{i:05d}.{ext}", "text": caption}) + "\n")
    return root


def write_hf(root: Path, items: list) -> Path:
    import datasets

    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for data, _ in items], "text": [c for _, c in items]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    table.save_to_disk(str(root))
    return root


def write_webdataset(root: Path, items: list, shards: int) -> str:
    root.mkdir(parents=True)
    per = -(-len(items) // shards)
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(s * per, min((s + 1) * per, len(items))):
                data, caption = items[i]
                for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / f"shard-{{000..{shards - 1:03d}}}.tar")


def build_source(kind: str, tmp: Path, args, cache: dict):
    res = args.resolution
    augment = dict(center_crop=False, random_flip=True, seed=0)
    if kind == "shapes":
        from ldm.tasks.shapes.dataset import ShapesDataset

        return ShapesDataset(size=args.images, resolution=res)
    w, h = (int(v) for v in args.source_size.lower().split("x"))
    if "images" not in cache:
        cache["images"] = list(make_images(args.images, (w, h)))
    fmt = "PNG" if kind == "folder-png" else "JPEG"
    key = f"bytes-{fmt}"
    if key not in cache:
        cache[key] = [(encode(image, fmt), caption) for image, caption in cache["images"]]
    items = cache[key]
    if kind.startswith("folder"):
        from ldm.data.image_folder import ImageFolderDataset

        return ImageFolderDataset(write_folder(tmp / kind, items, fmt.lower()[:3] if fmt == "PNG" else "jpg"),
                                  resolution=res, **augment)
    if kind == "hf":
        from ldm.data.hf_dataset import HFDataset

        return HFDataset(str(write_hf(tmp / "hf", items)), resolution=res, load_from_disk=True, **augment)
    if kind == "webdataset":
        from ldm.data.webdataset import WebDatasetSource

        return WebDatasetSource(write_webdataset(tmp / "wds", items, args.shards), resolution=res,
                                shuffle_buffer=64, **augment)
    raise SystemExit(f"unknown source {kind!r}; choose from {SOURCES}")


def throughput(dataset, workers: int, args) -> float:
    """Images/s over `epochs` passes, after the first batch (worker start-up and warm-up excluded)."""
    from ldm.data.collate import collate_image_caption

    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=not iterable, num_workers=workers,
                        collate_fn=collate_image_caption, persistent_workers=workers > 0)
    count, start = 0, None
    for _ in range(args.epochs):
        for batch in loader:
            if start is None:
                start = time.perf_counter()  # after the first batch
                continue
            count += batch["image"].shape[0]
    elapsed = time.perf_counter() - start
    return count / elapsed if elapsed > 0 else float("nan")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = [s.strip() for s in args.sources.split(",") if s.strip()]
    workers = [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rows, cache = [], {}
    try:
        for kind in kinds:
            dataset = build_source(kind, tmp, args, cache)
            row = {"bench": "data", "label": args.label, "source": kind}
            for w in workers:
                row[f"img/s w={w}"] = throughput(dataset, w, args)
            if len(workers) > 1 and row[f"img/s w={workers[0]}"] > 0:
                row[f"w={workers[-1]}/w={workers[0]}"] = row[f"img/s w={workers[-1]}"] / row[f"img/s w={workers[0]}"]
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"data: {args.images} images of {args.source_size} -> {args.resolution}px (random crop + flip), "
          f"batch {args.batch}, {args.epochs} epochs, torch threads {args.threads}")
    columns = ["source"] + [f"img/s w={w}" for w in workers]
    if len(workers) > 1:
        columns.append(f"w={workers[-1]}/w={workers[0]}")
    common.print_table(rows, columns)
    for row in rows:
        if len(workers) > 1:
            print(f"ratio {row['source']} workers {workers[-1]}/{workers[0]}: {row[columns[-1]]:.3f}x")
    common.append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
