"""Aspect-ratio buckets vs square crops: training throughput of `train.py data=folder` at the same max pixel count.

Writes a folder of mixed aspect ratios (2:1, 1:2, 4:3, 3:4, 16:9, 9:16, 1:1; PIL-drawn shapes on noise), then runs
the real train(cfg) of `python train.py data=folder data.train.root=DIR data.train.resolution=R` (default model,
sampling callbacks and validation off) both ways, each from its own automatic latent cache (built before timing):
  square:  data.train.buckets.enabled=false   (every image a centre square crop of R x R)
  buckets: data.train.buckets.enabled=true data.train.buckets.step=S   (kohya's buckets of area <= R x R)
The arms alternate in --rounds rounds in this one process (the order flips every round). Per arm: the median of
the runs' images/s (the ThroughputCallback's images over the seconds between batch ends, steps after the first; a
bucket's smaller last batch counts its own images), and that x the mean pixels of a training image (R^2 for square
crops; the bucket areas weighted by their images for buckets): pixels/s. ratio = buckets / square (goal >= 0.9),
for images/s and for pixels/s (a bucket holds at most R^2 pixels, so the pixel ratio is the stricter one).

    python bench/buckets.py                    # 240 images, R=64, step 16, 40 steps of 8, 3 rounds
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402
from bench.own_folder import compose  # noqa: E402

RATIOS = [(2, 1), (1, 2), (4, 3), (3, 4), (16, 9), (9, 16), (1, 1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--step", type=int, default=16, help="data.train.buckets.step")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--override", action="append", default=[], help="more train.py overrides (repeatable)")
    p.add_argument("--label", default="")
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    return p.parse_args(argv)


def write_mixed(root: Path, n: int, resolution: int, seed: int = 0) -> Path:
    """n images of the RATIOS in turn, the long side 1.5 x resolution, a coloured ellipse on noise, captioned."""
    import numpy as np
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
    for i in range(n):
        rw, rh = RATIOS[i % len(RATIOS)]
        long = int(resolution * 1.5)
        size = (long, round(long * rh / rw)) if rw >= rh else (round(long * rw / rh), long)
        noise = np.random.default_rng(i).integers(150, 255, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(noise)
        name = rng.choice(list(colours))
        w, h = size
        ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colours[name])
        image.save(root / f"{i:05d}.png")
        (root / f"{i:05d}.txt").write_text(f"a {name} ellipse, {rw}:{rh}")
    return root


def mean_pixels(root: Path, resolution: int, step: int) -> float:
    """Mean bucket area of the folder's images (each image trains once per epoch)."""
    from ldm.data.image_folder import ImageFolderDataset

    a = ImageFolderDataset(root, resolution=resolution, buckets={"enabled": True, "step": step}).bucket_assignment
    return sum(w * h * n for (w, h), n in zip(a.buckets, a.counts())) / len(a.bucket_of)


def main(argv=None) -> list[dict]:
    import torch

    from ldm.training.run.train import train

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_buckets_"))
    images = write_mixed(work / "mixed", args.images, args.resolution)
    base = ["data=folder", f"data.train.root={images}", f"data.train.resolution={args.resolution}",
            f"data.batch_size={args.batch}", "data.num_workers=0", "data.val_fraction=0",
            f"trainer.max_steps={args.steps}", "callbacks=none",
            "+callbacks.throughput._target_=ldm.training.callbacks.throughput.ThroughputCallback", "trainer.limit_val_batches=0",
            "trainer.val_check_interval=null", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", f"paths.cache_dir={work / 'cache'}",
            *args.override]
    arms = {"square": ["data.train.buckets.enabled=false"],
            "buckets": ["data.train.buckets.enabled=true", f"data.train.buckets.step={args.step}"]}
    pixels = {"square": float(args.resolution ** 2), "buckets": mean_pixels(images, args.resolution, args.step)}
    runs = 0

    def run(arm: str, steps: int | None = None) -> float | None:
        nonlocal runs
        runs += 1
        run_dir = work / f"run-{runs:02d}-{arm}"
        extra = [f"trainer.max_steps={steps}"] if steps else []
        result = train(compose(base + arms[arm] + extra + [f"paths.run_dir={run_dir}"]))
        assert result["global_step"] == (steps or args.steps), result
        return result["images_per_sec"]

    start = time.perf_counter()
    for arm in arms:  # build both latent caches (and warm up) before anything is timed
        run(arm, steps=2)
    print(f"latent caches built in {time.perf_counter() - start:.1f} s")
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    order = list(arms)
    for r in range(args.rounds):
        for arm in order if r % 2 == 0 else order[::-1]:
            rates[arm].append(run(arm))
    img_s = {arm: statistics.median(rates[arm]) for arm in arms}
    px_s = {arm: img_s[arm] * pixels[arm] for arm in arms}
    ratio, px_ratio = img_s["buckets"] / img_s["square"], px_s["buckets"] / px_s["square"]
    setup = (f"{args.images} mixed-aspect PNGs, resolution {args.resolution}, step {args.step}, {args.steps} steps "
             f"of {args.batch}, default model, latent cache, threads={args.threads}"
             + (f", overrides {args.override}" if args.override else ""))
    rows = [{"bench": "buckets", "label": args.label, "path": arm, "img/s": img_s[arm],
             "px/img": pixels[arm], "Mpx/s": px_s[arm] / 1e6, "setup": setup} for arm in arms]
    rows[-1].update({"ratio": ratio, "px ratio": px_ratio})
    print(common.env_line(torch.device("cpu")))
    print(f"buckets: {setup}")
    common.print_table(rows, ["path", "img/s", "px/img", "Mpx/s", "ratio", "px ratio"])
    print(f"ratio buckets/square: {ratio:.3f}x images/s, {px_ratio:.3f}x pixels/s (goal >= 0.9)")
    common.append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
