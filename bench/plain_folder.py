"""The README's own-folder command, from scratch, on two folders of our own making, judged by a classifier.

    python bench/plain_folder.py [--out DIR] [--kinds icons swatches] [--n 2000] [--threads 2] [-- overrides]

For each kind of folder (bench/folders.py: ``icons``, black line art on white; ``swatches``, colourful textures;
ten classes each, captions naming the class):

1. writes the folder (``--n`` PNGs at 32 px + metadata.jsonl);
2. fits a small RGB CNN (the judge) on the folder's real images and scores it on 500 fresh real images;
3. runs the README's command as it stands, ``python train.py data=folder data.train.root=<folder>
   data.train.resolution=32`` (plus the run folder; no other setting), timing wall and process CPU time and
   reading the load average (other work on the machine slows the wall time);
4. samples ``--per-class`` images of every class from the final EMA weights (prompts: the class captions, cycling
   through the caption templates; guidance 3, DDIM 25) and reports the fraction the judge names as prompted;
5. prints what train() chose for the folder (its "chosen for your data" block) and the summary's VAE check.

Targets (issue 27): >= 90% recognised as prompted for each folder, <= 15 minutes per folder on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # python bench/plain_folder.py: import ldm and bench from this checkout
    sys.path.insert(0, str(ROOT))

from bench import folders  # noqa: E402
from bench.own_data import run_timed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--kinds", nargs="+", default=list(folders.KINDS), choices=list(folders.KINDS))
    p.add_argument("--n", type=int, default=1000, help="images in each training folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process (1: on a shared "
                   "2-core machine, 2 threads beside other work run several times slower)")
    p.add_argument("--per-class", type=int, default=20, help="samples per class for the accuracy")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps per sample")
    p.add_argument("--run", action="store_true", help="judge the finished runs in --out again (no training)")
    p.add_argument("--json", default=None, help="append one result row per folder to this JSON-lines file")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides after -- (the bench's tests shrink the run)")
    return p.parse_args(argv)


def train_command(root: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    """README "Your own folder": the command as users type it, plus where its run and caches go."""
    return [sys.executable, str(ROOT / "train.py"), "data=folder", f"data.train.root={root}",
            "data.train.resolution=32", f"paths.run_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra",
            f"paths.cache_dir={run_dir}/cache",
            "trainer.enable_progress_bar=false", *overrides]


@torch.no_grad()
def sample_accuracy(kind: str, ckpt: Path, judge, per_class: int, guidance: float, steps: int,
                    seed: int = 1234) -> dict:
    from ldm.formats.training_checkpoint import load_training_checkpoint
    from ldm.pipelines import text_to_image

    bundle = load_training_checkpoint(ckpt, use_ema=True)
    bundle.unet.eval()
    prompts, labels = folders.prompts(kind, per_class)
    images = torch.cat([text_to_image(bundle, prompts[s:s + 50], sampler="ddim", steps=steps, guidance_scale=guidance,
                                      seed=seed + s, height=32, width=32) for s in range(0, len(prompts), 50)])
    predicted = judge.predict(images)
    per = {c: sum(p == c for p, y in zip(predicted, labels) if y == c) / per_class for c in folders.classes(kind)}
    return {"acc": sum(p == y for p, y in zip(predicted, labels)) / len(labels), "per_class": per, "images": images,
            "prompts": prompts, "predicted": predicted}


def chosen_block(log: str) -> list[str]:
    """train()'s "chosen for your data" block and its summary's VAE check, from the run's output."""
    lines = log.splitlines()
    start = next((i for i, x in enumerate(lines) if x.startswith("chosen for your data")), None)
    block = [] if start is None else [lines[start]] + [x for x in lines[start + 1:start + 6] if x.startswith("  ")]
    return block + [x.strip() for x in lines if x.strip().startswith(("vae check:", "first stage: done"))]


def bench_folder(kind: str, args, out: Path) -> dict:
    from ldm.pipelines.images import labelled_grid, to_pil

    folder, run_dir = out / kind, out / f"run_{kind}"
    if not (folder / "metadata.jsonl").is_file():
        folders.write_folder(kind, folder, args.n, seed=0)
    t = time.perf_counter()
    judge = folders.fit_judge(kind, *folders.read_folder(kind, folder))
    test_x, test_y = folders.render(kind, 500, seed=102)
    names = folders.classes(kind)
    judge_acc = sum(p == names[y] for p, y in zip(judge.predict(test_x), test_y.tolist())) / len(test_y)
    print(f"[{kind}] judge: {judge_acc:.1%} on 500 fresh real images (fit on the folder's {args.n} in "
          f"{time.perf_counter() - t:.0f} s)")
    timing: dict = {}
    if not args.run:
        cmd = train_command(folder, run_dir, args.overrides)
        print(f"[{kind}] training:", " ".join(cmd[1:]), flush=True)
        load_before = os.getloadavg()
        timing = run_timed(cmd, args.threads, out / f"train_{kind}.log")
        timing["load_before"], timing["load_after"] = load_before, os.getloadavg()
        print(f"[{kind}] training: wall {timing['wall_s'] / 60:.1f} min, process CPU {timing['cpu_s'] / 60:.1f} min "
              f"({args.threads} torch threads); load average before {load_before[0]:.1f}, after "
              f"{timing['load_after'][0]:.1f} (1 min)")
    choices = chosen_block((out / f"train_{kind}.log").read_text())
    print("\n".join(f"[{kind}] {x}" for x in choices))
    res = sample_accuracy(kind, run_dir / "checkpoints" / "last.ckpt", judge, args.per_class, args.guidance,
                          args.steps)
    print(f"[{kind}] samples recognised as prompted: {res['acc']:.1%} of {len(res['prompts'])} (guidance "
          f"{args.guidance}, DDIM {args.steps}, EMA); per class: "
          + ", ".join(f"{c} {a:.0%}" for c, a in res["per_class"].items()))
    step = max(1, args.per_class // 2)
    labelled_grid(to_pil(res["images"][::step]), ncol=10, scale=3,
                  labels=[f"{p} -> {q}" for p, q in zip(res["prompts"][::step], res["predicted"][::step])]
                  ).save(out / f"samples_{kind}.png")
    row = {"bench": "plain_folder", "kind": kind, "judge_acc": judge_acc, "sample_acc": res["acc"],
           "n_samples": len(res["prompts"]), "per_class": res["per_class"], "chosen": choices, **timing,
           "threads": args.threads, "overrides": args.overrides, "run_dir": str(run_dir)}
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))  # the judge and the sampling here, as the training process
    out = Path(args.out or tempfile.mkdtemp(prefix="ldm_plain_folder_"))
    out.mkdir(parents=True, exist_ok=True)
    rows = [bench_folder(kind, args, out) for kind in args.kinds]
    print("\n| folder | judge on real | samples as prompted | wall min | CPU min | load (1 min) before / after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        load = f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}" if "load_before" in r else "-"
        wall = f"{r['wall_s'] / 60:.1f}" if "wall_s" in r else "-"
        cpu = f"{r['cpu_s'] / 60:.1f}" if "cpu_s" in r else "-"
        print(f"| {r['kind']} | {r['judge_acc']:.1%} | {r['sample_acc']:.1%} of {r['n_samples']} | {wall} | {cpu} "
              f"| {load} |")
    return rows


if __name__ == "__main__":
    main()
