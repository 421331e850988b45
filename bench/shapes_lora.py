"""The LoRA example of docs/adapters.md: teach the shapes model a colour it has never seen, and measure it.

    python bench/shapes_lora.py --base <base run>/checkpoints/last.ckpt [--out DIR] [-- extra train.py overrides]

1. scores the base on every colour x shape prompt of the six trained colours and of "cyan" (a word its text encoder
   knows but no caption held), with the shapes checker over all seven colours;
2. runs ``python train.py experiment=shapes_lora model.pretrained=<base>`` (a LoRA on the frozen U-Net), timing
   wall and process CPU time;
3. scores the run's final checkpoint (base + EMA adapter merged) the same way.
Prints cyan's accuracy before/after and the six old colours' before/after (they should stay within 5 points).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import append_jsonl  # noqa: E402
from bench.concept_accuracy import concept_accuracy, shapes_prompts  # noqa: E402
from bench.own_data import run_timed  # noqa: E402

OLD = ["red", "green", "blue", "yellow", "orange", "purple"]
NEW = "cyan"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base shapes checkpoint (a `python train.py` run's last.ckpt)")
    p.add_argument("--out", default=None, help="run folder of the LoRA training (default: a temporary one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-prompt", type=int, default=8, help="samples per colour x shape prompt")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    return p.parse_args(argv)


def score(ckpt: str, per_prompt: int, guidance: float) -> dict:
    import torch
    from ldm.formats.load import load_bundle

    torch.manual_seed(0)
    bundle = load_bundle(ckpt)
    items = shapes_prompts([*OLD, NEW], per_prompt)
    acc = concept_accuracy(bundle, items, checker_colors=[*OLD, NEW], guidance=guidance)
    old = [acc[c] for c in OLD]
    acc["old"] = {m: sum(a[m] * a["n"] for a in old) / sum(a["n"] for a in old) for m in ("color_acc", "shape_acc")}
    return acc


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="shapes_lora_"))
    before = score(args.base, args.per_prompt, args.guidance)
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=shapes_lora", f"model.pretrained={args.base}",
           f"hydra.run.dir={out}", "trainer.enable_progress_bar=false", *args.overrides]
    timing = run_timed(cmd, args.threads, out.parent / f"{out.name}.log")
    after = score(str(out / "checkpoints" / "last.ckpt"), args.per_prompt, args.guidance)
    row = {"bench": "shapes_lora", **timing, "before": before, "after": after, "run": str(out)}
    print(f"LoRA training (experiment=shapes_lora): {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} CPU-s")
    print(f"{'':22s} {'colour before':>14s} {'after':>7s} {'shape before':>13s} {'after':>7s}")
    for key, name in ((NEW, "cyan (new)"), ("old", "six old colours"), *((c, c) for c in OLD)):
        b, a = before[key], after[key]
        print(f"{name:22s} {b['color_acc']:14.1%} {a['color_acc']:7.1%} {b['shape_acc']:13.1%} {a['shape_acc']:7.1%}")
    append_jsonl(args.json, [row])
    return row


if __name__ == "__main__":
    main()
