"""Latent-cache build time with 1 vs 2 (or more) processes on the same image folder, in the same run.

Each process is what a DDP rank does in train(cfg) (`ldm.data.auto_cache.sync_cache`): it claims whole parts of
`--part-size` rows and encodes them with the VAE. The processes are started, build their VAE (same seed, same
weights) and then wait; the clock runs from the moment they are released until the last one returns, so process
start-up is not counted. Every build writes a fresh cache folder; the script checks that the caches of 1 and of
N processes are the same bytes, and prints encode s/img and cache bytes/img (docs/scale.md uses them).

    python bench/cache_ranks.py                       # CPU: 64 images, 64 px, small VAE, 1 vs 2 processes
    python bench/cache_ranks.py --vae sd --resolution 256 --images 32 --ranks 1,2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--vae", default="small", help="AutoencoderKL preset (sd: SD's f=8 size, small, tiny)")
    p.add_argument("--ranks", default="1,2", help="process counts to compare, the first is the baseline")
    p.add_argument("--part-size", type=int, default=8, help="rows per part (the unit a process claims)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--label", default="")
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    return p.parse_args(argv)


def write_folder(root: Path, n: int, size: int) -> None:
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), (40 + 7 * i % 200, 90, 200 - 5 * i % 150))
        ImageDraw.Draw(image).ellipse((size // 8 + i % 7, size // 6, size - size // 5, size - size // 8 - i % 5),
                                      fill=(230, 200 - 3 * i % 180, 30))
        image.save(root / f"{i:05d}.png")
        (root / f"{i:05d}.txt").write_text(f"image {i}")


def _worker(args, root: str, folder: str, ready, go, results) -> None:
    import torch

    from ldm.data.auto_cache import cache_spec, sync_cache
    from ldm.data.image_folder import ImageFolderDataset
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.training.run.latent_prep import make_encode

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_preset(args.vae).eval()
    spec = cache_spec(ImageFolderDataset(root, resolution=args.resolution))
    encode = make_encode(vae, None, "posterior")
    ready.put(True)
    go.wait()
    start = time.perf_counter()
    view = sync_cache(folder, spec, encode, batch_size=args.batch, progress=False, sample=False,
                      part_size=args.part_size, poll_seconds=0.02)
    results.put((view.encoded, time.perf_counter() - start))


def build(args, root: Path, folder: Path, ranks: int) -> dict:
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(args, str(root), str(folder), ready, go, results))
             for _ in range(ranks)]
    for p in procs:
        p.start()
    for _ in procs:  # every worker imported and built its VAE: the clock starts now
        ready.get(timeout=600)
    go.set()
    start = time.perf_counter()
    done = [results.get(timeout=3600) for _ in procs]
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
    return {"wall_s": wall, "encoded": [e for e, _ in done]}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    counts = [int(r) for r in args.ranks.split(",")]
    rows, caches = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        write_folder(root, args.images, args.resolution)
        for ranks in counts:
            folder = Path(tmp) / f"cache-{ranks}"
            result = build(args, root, folder, ranks)
            shards = sorted(folder.glob("part-*/shard-*.safetensors"))
            caches[ranks] = {str(p.relative_to(folder)): p.read_bytes() for p in shards}
            nbytes = sum(len(b) for b in caches[ranks].values())
            rows.append({"label": args.label, "ranks": ranks, "vae": args.vae, "px": args.resolution,
                         "images": args.images, "wall s": result["wall_s"],
                         "img/s": args.images / result["wall_s"], "encoded per process": result["encoded"],
                         "cache bytes/img": nbytes / args.images,
                         "encode s/img/process": result["wall_s"] * ranks / args.images})
    base = rows[0]["wall s"]
    for row in rows:
        row["speed-up"] = base / row["wall s"]
    same = all(caches[r] == caches[counts[0]] for r in counts)
    common.print_table(rows, ["ranks", "vae", "px", "images", "wall s", "img/s", "speed-up",
                                    "encoded per process", "cache bytes/img", "encode s/img/process"],
                       title=f"latent cache build, 1 vs {counts[1:]} processes ({args.threads} thread(s) each)")
    print(f"caches identical byte for byte across process counts: {same}")
    if not same:
        raise SystemExit("the caches differ: a build with several processes must give the one-process bytes")
    for ranks, row in zip(counts[1:], rows[1:]):
        print(f"ratio cache build time {counts[0]} / {ranks} process(es): {base / row['wall s']:.2f}x")
    common.append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
