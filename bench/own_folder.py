"""Your own image folder, end to end: `train.py data=folder` with the automatic latent cache vs on the fly.

Writes a folder of PIL-drawn glyphs (dark letters on white, ten classes, metadata.jsonl captions "a letter k"),
then runs the real train(cfg) of `python train.py data=folder data.train.root=DIR` (default model, batch and
workers; no sampling callbacks, no validation) for --steps steps, both ways:
  on-the-fly: data.latent_cache=null   (PNG decode + VAE encode + text encoder in every step)
  cached:     data.latent_cache=<tmp>  (the default: built on the first run, reused afterwards)
The first cached run (the cache is built in it) is timed on its own; then the two arms alternate in --rounds
rounds in this one process (the order flips every round) and the median wall time of each arm is compared:
ratio = on-the-fly seconds / cached seconds (> 1: the cache is faster), for the whole train() call (model build,
data setup, the cache's up-to-date check, fitting) and for the fit alone (from the throughput logged per step).

    python bench/own_folder.py                    # 400 glyphs at 32 px, 60 steps, 3 rounds (~5 min on 2 cores)
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "AEHKMOSTXZ"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="data.batch_size (default: the data config's)")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the data config's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--override", action="append", default=[], help="more train.py overrides (repeatable)")
    p.add_argument("--label", default="")
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    return p.parse_args(argv)


def write_glyphs(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """n images of size x size: a dark letter (random offset, rotation, stroke) on white, captioned by class."""
    from PIL import Image, ImageDraw, ImageFont

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    try:
        font = ImageFont.load_default(size=int(size * 2.6))
    except TypeError:  # Pillow < 10.1: one small bitmap font
        font = ImageFont.load_default()
    rows = []
    for i in range(n):
        letter = LETTERS[i % len(LETTERS)]
        canvas = Image.new("L", (size * 4, size * 4), 255)
        ImageDraw.Draw(canvas).text(
            (size * 2 + rng.randint(-size // 4, size // 4), size * 2 + rng.randint(-size // 4, size // 4)), letter,
            fill=rng.randint(0, 60), font=font, anchor="mm", stroke_width=rng.randint(0, 3), stroke_fill=0)
        image = canvas.rotate(rng.uniform(-15, 15), fillcolor=255).resize((size, size), Image.Resampling.LANCZOS)
        name = f"{i:05d}.png"
        image.save(root / name)
        rows.append({"file_name": name, "text": f"a letter {letter.lower()}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldm.training.run.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def fit_seconds(run_dir: Path, batch: int) -> float | None:
    """Seconds of the fit from the per-step throughput the run logged (steps after the first)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return None
    with open(path) as f:
        rates = [float(r["train/images_per_sec"]) for r in csv.DictReader(f) if r.get("train/images_per_sec")]
    return None if not rates else sum(batch / r for r in rates)


def main(argv=None) -> list[dict]:
    import torch

    from ldm.training.run.train import train

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_own_folder_"))
    images = write_glyphs(work / "glyphs", args.images, args.resolution)
    base = ["data=folder", f"data.train.root={images}", f"data.train.resolution={args.resolution}",
            f"trainer.max_steps={args.steps}", "callbacks=none", "+callbacks.throughput._target_="
            "ldm.training.callbacks.throughput.ThroughputCallback", "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
            f"paths.cache_dir={work / 'cache'}"]
    if args.batch:
        base.append(f"data.batch_size={args.batch}")
    if args.workers is not None:
        base.append(f"data.num_workers={args.workers}")
    base += args.override
    arms = {"on-the-fly": ["data.latent_cache=null"], "cached": []}
    runs = 0

    def run(arm: str) -> tuple[float, float | None]:
        nonlocal runs
        runs += 1
        run_dir = work / f"run-{runs:02d}-{arm}"
        cfg = compose(base + arms[arm] + [f"paths.run_dir={run_dir}"])
        start = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - start
        assert result["global_step"] == args.steps, result
        return seconds, fit_seconds(run_dir, int(cfg.data.batch_size))

    first, _ = run("cached")  # first use: the cache is built inside this run
    times: dict[str, list[tuple[float, float | None]]] = {arm: [] for arm in arms}
    order = list(arms)
    for r in range(args.rounds):
        for arm in order if r % 2 == 0 else order[::-1]:
            times[arm].append(run(arm))
    median = {arm: statistics.median(t for t, _ in times[arm]) for arm in arms}
    fit = {arm: statistics.median(f for _, f in times[arm]) if all(f for _, f in times[arm]) else None
           for arm in arms}
    ratio = median["on-the-fly"] / median["cached"]
    fit_ratio = fit["on-the-fly"] / fit["cached"] if fit["on-the-fly"] and fit["cached"] else None
    setup = (f"{args.images} glyph PNGs {args.resolution}px, {args.steps} steps, default model/batch/workers"
             + (f", overrides {args.override}" if args.override else "") + f", threads={args.threads}")
    rows = [
        {"bench": "own_folder", "label": args.label, "path": "on-the-fly (data.latent_cache=null)",
         "train() s": median["on-the-fly"], "fit s": fit["on-the-fly"], "setup": setup},
        {"bench": "own_folder", "label": args.label, "path": "automatic cache (reused)",
         "train() s": median["cached"], "fit s": fit["cached"], "ratio": ratio, "fit ratio": fit_ratio,
         "setup": setup},
        {"bench": "own_folder", "label": args.label, "path": "automatic cache (first run: built in it)",
         "train() s": first, "setup": setup},
    ]
    print(common.env_line(torch.device("cpu")))
    print(f"own folder: {setup}")
    common.print_table(rows, ["path", "train() s", "fit s", "ratio", "fit ratio"])
    print(f"ratio on-the-fly/cached wall time, whole train(): {ratio:.3f}x"
          + (f"; fit only: {fit_ratio:.3f}x" if fit_ratio else ""))
    common.append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
