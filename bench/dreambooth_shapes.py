"""DreamBooth on the embedded default: does the shapes model learn "sks" (= cyan, a colour it never saw) and keep
its old prompts?

    python bench/dreambooth_shapes.py --base <base run>/checkpoints/last.ckpt [--out DIR] [-- train.py overrides]

1. writes 16 instance images (the shapes dataset's renderer: cyan circles of random size and place on white);
2. scores the base model: the new concept ("a sks circle on a white background" and, not trained, "a sks square
   / triangle on a white background": cyan and the shape expected) and the old prompts (every colour x shape
   prompt of the default run, cycling through the backgrounds) with the shapes checker (palette: the six old
   colours + cyan, so drift of old prompts towards cyan counts as an error);
3. runs ``python train.py experiment=dreambooth_shapes`` (class images from the base model, then the fine-tune),
   timing wall and process CPU time;
4. scores the result the same way (same seeds), prints the before/after table and writes ``<out>/result.json``.

On a busy shared machine the wall time is inflated; the process CPU time (user + system, all threads) is the work.
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
if str(ROOT) not in sys.path:  # python bench/dreambooth_shapes.py: import ldm from this checkout
    sys.path.insert(0, str(ROOT))

CONCEPT = {"a sks circle on a white background": ("cyan", "circle"),  # the instance prompt
           "a sks square on a white background": ("cyan", "square"),  # not trained: does "sks" carry over?
           "a sks triangle on a white background": ("cyan", "triangle")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base shapes model (a training checkpoint of python train.py)")
    p.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--n-instance", type=int, default=16, help="instance images")
    p.add_argument("--per-prompt", type=int, default=16, help="samples per old prompt (18 prompts)")
    p.add_argument("--per-concept", type=int, default=32, help="samples per concept prompt")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps per sample")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    p.add_argument("--run", default=None, help="score this finished run folder instead of training")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    return p.parse_args(argv)


def write_instance_images(folder: Path, n: int, seed: int = 7) -> None:
    """Cyan circles on white, drawn by the shapes dataset (random size and position)."""
    from PIL import Image

    from ldm.data.shapes import ShapesDataset, render_shape

    ds = ShapesDataset(size=n, resolution=32, seed=seed, colors=("cyan",), shapes=("circle",),
                       backgrounds=("white",))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(render_shape(ds.spec(i), 32)).save(folder / f"sks_{i:03d}.png")


def old_prompts(per_prompt: int) -> list[str]:
    """The default run's colour x shape prompts (PromptAccuracyCallback's list)."""
    from ldm.data.shapes import ShapesDataset
    from ldm.training.callbacks import PromptAccuracyCallback

    return PromptAccuracyCallback(n_per_prompt=per_prompt).prompts(ShapesDataset(size=1))


@torch.no_grad()
def score(bundle, prompts: list[str], expected: list[tuple[str, str]], guidance: float, steps: int,
          seed: int) -> dict:
    from ldm.data.shape_palette import DEFAULT_COLORS
    from ldm.data.shapes_checker import ShapesChecker
    from ldm.pipelines import text_to_image

    checker = ShapesChecker(colors=(*DEFAULT_COLORS, "cyan"))
    bundle.unet.eval()
    images = torch.cat([text_to_image(bundle, prompts[s:s + 64], sampler="ddim", steps=steps, guidance_scale=guidance,
                                      seed=seed + s, height=32, width=32) for s in range(0, len(prompts), 64)])
    got = [checker.classify(im) for im in images]
    colour = sum(g[0] == e[0] for g, e in zip(got, expected)) / len(got)
    shape = sum(g[1] == e[1] for g, e in zip(got, expected)) / len(got)
    both = sum(g == e for g, e in zip(got, expected)) / len(got)
    cyan = sum(g[0] == "cyan" for g in got) / len(got)
    return {"colour_acc": colour, "shape_acc": shape, "both_acc": both, "cyan_share": cyan, "n": len(got),
            "images": images}


def evaluate(ckpt: str, args) -> dict:
    from ldm.data.shape_palette import parse_caption
    from ldm.formats.load import load_bundle

    bundle = load_bundle(ckpt)
    rows = {}
    for prompt, want in CONCEPT.items():
        rows[prompt] = score(bundle, [prompt] * args.per_concept, [want] * args.per_concept, args.guidance,
                             args.steps, seed=4321)
    old = old_prompts(args.per_prompt)
    rows["old prompts"] = score(bundle, old, [parse_caption(p) for p in old], args.guidance, args.steps, seed=1234)
    return rows


def run_timed(cmd: list[str], threads: int, log_path: Path) -> dict:
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
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from ldm.pipelines.images import labelled_grid, to_pil

    out = Path(args.out or tempfile.mkdtemp(prefix="ldm_dreambooth_"))
    instance, run_dir = out / "instance", Path(args.run or out / "run")
    write_instance_images(instance, args.n_instance)
    print(f"instance images: {instance} ({args.n_instance} cyan circles on white)")
    before = evaluate(args.base, args)
    timing: dict = {}
    if not args.run:
        cmd = [sys.executable, str(ROOT / "train.py"), "experiment=dreambooth_shapes", f"model.pretrained={args.base}",
               f"data.train.instance_root={instance}", f"data.train.class_root={out / 'class_images'}",
               f"paths.run_dir={run_dir}", "trainer.enable_progress_bar=false", *args.overrides]
        print("training:", " ".join(cmd[1:]))
        timing = run_timed(cmd, args.threads, out / "train.log")
        print(f"training (class images + fine-tune): wall {timing['wall_s']:.0f} s, process CPU {timing['cpu_s']:.0f} s "
              f"({args.threads} torch threads, load average {os.getloadavg()[0]:.1f}); log: {out / 'train.log'}")
    after = evaluate(str(run_dir / "checkpoints" / "last.ckpt"), args)

    print(f"\n| prompts (DDIM {args.steps}, guidance {args.guidance}) | before: colour / shape / cyan | "
          "after: colour / shape / cyan |\n|---|---|---|")
    for name in before:
        b, a = before[name], after[name]
        print(f"| {name} (x{b['n']}) | {b['colour_acc']:.1%} / {b['shape_acc']:.1%} / {b['cyan_share']:.1%} | "
              f"{a['colour_acc']:.1%} / {a['shape_acc']:.1%} / {a['cyan_share']:.1%} |")
    grid = out / "before_after.png"
    firsts = [r["images"][:4] for r in (*before.values(), *after.values())]
    labels = [f"{when}: {name}"[:40] for when in ("before", "after") for name in before for _ in range(4)]
    labelled_grid(to_pil(torch.cat(firsts)), labels=labels, ncol=4, scale=3).save(grid)
    print(f"grid: {grid}")
    result = {"before": {k: {m: v for m, v in r.items() if m != "images"} for k, r in before.items()},
              "after": {k: {m: v for m, v in r.items() if m != "images"} for k, r in after.items()},
              **timing, "threads": args.threads, "run_dir": str(run_dir), "overrides": args.overrides}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"result: {out / 'result.json'}")
    return result


if __name__ == "__main__":
    main()
