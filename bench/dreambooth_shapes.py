"""DreamBooth on the embedded default: does the shapes model learn "sks" (= cyan, a colour it never saw) and keep
its old prompts?

    python bench/dreambooth_shapes.py --base <base run>/checkpoints/last.ckpt [--out DIR] [-- train.py overrides]

1. writes 16 instance images (the shapes dataset's renderer: cyan circles of random size and place on white);
2. scores the base model: the new concept ("a sks circle on a white background", and "sks" with the shapes and
   backgrounds it was not trained with: cyan and the prompt's shape expected) and the old prompts (every colour x
   shape prompt of the default run, cycling through the backgrounds) with the shapes checker (bench/concept_accuracy;
   palette: the six old colours + cyan, so old prompts drifting to cyan count as errors);
3. runs ``python train.py experiment=dreambooth_shapes`` (class images from the base model, then the fine-tune),
   timing wall and process CPU time;
4. scores the result the same way (same seeds), prints the before/after table and writes ``<out>/result.json``.

On a busy shared machine the wall time is inflated; the process CPU time (user + system, all threads) is the work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # python bench/dreambooth_shapes.py: import ldm from this checkout
    sys.path.insert(0, str(ROOT))

from bench.concept_accuracy import concept_accuracy, shapes_prompts  # noqa: E402
from bench.own_data import run_timed  # noqa: E402

OLD = ["red", "green", "blue", "yellow", "orange", "purple"]
NEW = "cyan"  # what "sks" means in the instance images
INSTANCE_PROMPT = "a sks circle on a white background"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base shapes model (a training checkpoint of python train.py)")
    p.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--n-instance", type=int, default=16, help="instance images")
    p.add_argument("--per-prompt", type=int, default=16, help="samples per old colour x shape prompt (18 prompts)")
    p.add_argument("--per-concept", type=int, default=32, help="samples of the instance prompt")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training process (1: fastest for this small model, robust when shared)")
    p.add_argument("--run", default=None, help="score this finished run folder instead of training")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    return p.parse_args(argv)


def write_instance_images(folder: Path, n: int, seed: int = 7) -> None:
    """Cyan circles on white, drawn by the shapes dataset (random size and position)."""
    from PIL import Image

    from ldm.tasks.shapes.dataset import ShapesDataset, render_shape

    ds = ShapesDataset(size=n, resolution=32, seed=seed, colors=(NEW,), shapes=("circle",), backgrounds=("white",))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(render_shape(ds.spec(i), 32)).save(folder / f"sks_{i:03d}.png")


def evaluate(ckpt: str, args) -> dict:
    """The instance prompt (cyan circle expected); "sks" with every shape and background it was not trained with
    (cyan x shape prompts with cyan replaced by sks); the 18 old colour x shape prompts. The checker's palette is
    the old colours + cyan, so old prompts drifting to cyan count as errors."""
    from ldm.formats.load import load_bundle

    torch.manual_seed(0)
    bundle = load_bundle(ckpt)
    common = dict(checker_colors=[*OLD, NEW], guidance=args.guidance)  # at the model's training resolution
    concept = concept_accuracy(bundle, [(INSTANCE_PROMPT, NEW, "circle")] * args.per_concept, **common, seed=4321)
    carried = concept_accuracy(bundle, shapes_prompts([NEW], 4), **common, seed=4321,
                               prompt_of=lambda prompt: prompt.replace(NEW, "sks"))
    old = concept_accuracy(bundle, shapes_prompts(OLD, args.per_prompt), **common)
    return {"instance prompt": concept["all"], "sks x other shapes/backgrounds": carried["all"], "old prompts": old["all"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
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

    print(f"\n| prompts (DDIM 25, guidance {args.guidance}) | before: colour / shape | after: colour / shape |")
    print("|---|---|---|")
    for name in before:
        b, a = before[name], after[name]
        print(f"| {name} (x{b['n']}) | {b['color_acc']:.1%} / {b['shape_acc']:.1%} | "
              f"{a['color_acc']:.1%} / {a['shape_acc']:.1%} |")
    result = {"before": before, "after": after,
              **timing, "threads": args.threads, "run_dir": str(run_dir), "overrides": args.overrides}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"result: {out / 'result.json'}")
    return result


if __name__ == "__main__":
    main()
