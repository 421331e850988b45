"""Own data, from scratch, offline: the own-data command of docs/own-data.md on a glyph folder, judged by a classifier.

    python bench/own_data.py [--out DIR] [--threads 1] [--n 2000] [-- extra train.py overrides]

1. writes a glyph folder (ldm.tasks.glyphs: 10 letters, random font size, stroke, affine jitter, dark on white,
   captions "the letter K", "a drawing of the letter K", ...);
2. fits a small CNN on freshly rendered real glyphs and scores it on held-out real glyphs;
3. runs ``python train.py experiment=own_data data.train.root=<folder> data.train.resolution=32`` (stage 1: a VAE
   fit to the folder; stage 2: the diffusion model on its latents), timing wall and process CPU time;
4. samples ``--per-class`` images of every class (prompts cycle through the caption templates) from the final
   EMA weights with classifier-free guidance and reports the fraction the classifier names as the prompted class;
5. measures the trained VAE's round trip (PSNR, mean colour shift) on held-out real glyphs.

On a busy shared machine the wall time is inflated; the CPU time of the training process (user + system, all
threads) is the work done: with ``--threads 1`` it bounds the wall time on an idle machine from above.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # python bench/own_data.py: import ldm from this checkout
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--n", type=int, default=2000, help="glyph images in the training folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--per-class", type=int, default=20, help="samples per class for the accuracy")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps per sample")
    p.add_argument("--run", default=None, help="evaluate this finished run folder of the same command instead of "
                                               "training (its folder's glyphs are --out/glyphs)")
    p.add_argument("--ckpt", action="append", default=None,
                   help="checkpoint(s) of the run's checkpoints/ folder to judge (repeatable; default: last.ckpt), "
                        "e.g. --ckpt step0001000.ckpt: the same run at an earlier step")
    p.add_argument("--json", default=None, help="append the result row to this JSON-lines file")
    p.add_argument("--label", default="own_data")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    return p.parse_args(argv)


def train_command(root: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    """The own-data command of docs/own-data.md (plus the run folder and any extra overrides)."""
    return [sys.executable, str(ROOT / "train.py"), "experiment=own_data", f"data.train.root={root}",
            "data.train.resolution=32", f"paths.run_dir={run_dir}", "trainer.enable_progress_bar=false", *overrides]


def run_timed(cmd: list[str], threads: int, log_path: Path) -> dict:
    """Run ``cmd``; wall seconds and the child's CPU seconds (user + system, every thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}); see {log_path}:\n"
                         + "\n".join(log_path.read_text().splitlines()[-30:]))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "max_rss_mb": after.ru_maxrss / 1024}


@torch.no_grad()
def sample_accuracy(ckpt: Path, classifier, per_class: int, guidance: float, steps: int, seed: int = 1234,
                    use_ema: bool = True) -> dict:
    from ldm.pipelines import text_to_image
    from ldm.tasks.glyphs.dataset import CLASSES, TEMPLATES
    from ldm.formats.training_checkpoint import load_training_checkpoint

    bundle = load_training_checkpoint(ckpt, use_ema=use_ema)
    bundle.unet.eval()
    prompts = [TEMPLATES[(i + r) % len(TEMPLATES)].format(c=c) for i, c in enumerate(CLASSES) for r in range(per_class)]
    labels = [c for c in CLASSES for _ in range(per_class)]
    images = torch.cat([text_to_image(bundle, prompts[s:s + 50], sampler="ddim", steps=steps, guidance_scale=guidance,
                                      seed=seed + s, height=32, width=32) for s in range(0, len(prompts), 50)])
    predicted = classifier.predict(images)
    per = {c: sum(p == c for p, y in zip(predicted, labels) if y == c) / per_class for c in CLASSES}
    return {"acc": sum(p == y for p, y in zip(predicted, labels)) / len(labels), "per_class": per,
            "images": images, "prompts": prompts}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from ldm.evaluation.reconstruction import check_autoencoder
    from ldm.pipelines.images import labelled_grid, to_pil
    from ldm.tasks.glyphs.classifier import accuracy, fit_classifier, render_set
    from ldm.tasks.glyphs.dataset import CLASSES, write_glyph_folder
    from ldm.training.build.factories import autoencoder

    out = Path(args.out or tempfile.mkdtemp(prefix="ldm_own_data_"))
    folder, run_dir = out / "glyphs", out / "run"
    if not (folder / "metadata.jsonl").is_file():
        write_glyph_folder(folder, n=args.n, resolution=32, seed=0)
    print(f"glyph folder: {folder} ({args.n} images, {len(CLASSES)} classes)")

    t = time.perf_counter()
    train_x, train_y = render_set(3000, seed=101)
    test_x, test_y = render_set(1000, seed=102)
    classifier = fit_classifier(train_x, train_y)
    clf_acc = accuracy(classifier, test_x, [CLASSES[i] for i in test_y])
    print(f"classifier: {clf_acc:.1%} on 1000 held-out real glyphs (fit in {time.perf_counter() - t:.0f} s)")

    timing: dict = {}
    if args.run:
        run_dir = Path(args.run)
        print(f"evaluating the finished run {run_dir} (not timed here)")
    else:
        cmd = train_command(folder, run_dir, args.overrides)
        print("training:", " ".join(cmd[1:]))
        timing = run_timed(cmd, args.threads, out / "train.log")
        print(f"training: wall {timing['wall_s'] / 60:.1f} min, process CPU {timing['cpu_s'] / 60:.1f} min "
              f"({args.threads} torch thread(s)); log: {out / 'train.log'}")

    ae = autoencoder(weights=str(run_dir / "first_stage" / "autoencoder.safetensors")).eval()
    vae = check_autoencoder(ae, test_x[:256])
    print(f"VAE round trip on 256 held-out real glyphs: {vae}")

    row = {}
    for name in args.ckpt or ["last.ckpt"]:
        res = sample_accuracy(run_dir / "checkpoints" / name, classifier, args.per_class, args.guidance, args.steps)
        print(f"{name}: samples recognised as the prompted class: {res['acc']:.1%} of {len(res['prompts'])} "
              f"(guidance {args.guidance}, DDIM {args.steps}); per class: "
              + ", ".join(f"{c} {a:.0%}" for c, a in res["per_class"].items()))
        grid = out / f"samples_by_class{'' if name == 'last.ckpt' else '_' + Path(name).stem}.png"
        labelled_grid(to_pil(res["images"][:: args.per_class // 2 or 1]), ncol=len(CLASSES) // 2 * 2,
                      labels=res["prompts"][:: args.per_class // 2 or 1], scale=3).save(grid)
        print(f"grid of samples: {grid}")
        row = {"label": args.label, "ckpt": name, "classifier_acc": clf_acc, "sample_acc": res["acc"],
               "per_class": res["per_class"], "vae_psnr_db": vae.psnr_db, "vae_colour_shift": vae.colour_shift,
               **timing, "threads": args.threads, "overrides": args.overrides, "run_dir": str(run_dir)}
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
