"""docs/controlnet.md's shapes task: a ControlNet that puts the prompted shape where its silhouette is, measured.

    python bench/controlnet_shapes.py --base <base run>/checkpoints/last.ckpt [--out DIR] [--steps 600]
                                      [-- extra train.py overrides]

1. runs ``python train.py adapter=controlnet data=shapes_silhouette model.pretrained=<base>
   adapter.hint_channels=[16,32,64] trainer.max_steps=<steps>`` (the ControlNet trains on the frozen base), timing
   wall and process CPU time;
2. reads the run's ControlNet (``<run>/controlnet/``, the diffusers folder) and the base, and samples the captions
   of ``--n`` fresh silhouette items (seed 1, never trained on) with and without it (same seeds, DDIM 20, guidance
   3: ``ldm.tasks.shapes.silhouette.evaluate_silhouettes``);
3. prints the mean IoU of the drawn shape with the silhouette and the prompt accuracy (colour, shape) both ways,
   writes ``<out>/result.json`` and a grid ``<out>/grid.png`` (control | with | without, 8 items).

Targets (issue 30): IoU >= 0.8 with the ControlNet (without: a shape drawn anywhere), prompt accuracy within 5
points of the base's, <= 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # python bench/controlnet_shapes.py: import ldm from this checkout
    sys.path.insert(0, str(ROOT))

from bench.common import append_jsonl  # noqa: E402
from bench.own_data import run_timed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base shapes checkpoint (a `python train.py` run's last.ckpt)")
    p.add_argument("--out", default=None, help="run folder of the ControlNet training (default: a temporary one)")
    p.add_argument("--steps", type=int, default=600, help="training steps of the ControlNet")
    p.add_argument("--n", type=int, default=64, help="fresh silhouette items sampled both ways")
    p.add_argument("--resolution", type=int, default=32, help="the base's training side (the shapes: 32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    return p.parse_args(argv)


def grid(bundle, controlnet, dataset, out: Path, n: int = 8) -> Path:
    """control | with the ControlNet | without, for the first ``n`` items (the same seeds as the evaluation)."""
    from PIL import Image

    from ldm.pipelines import text_to_image
    from ldm.pipelines.controlnet import Control

    items = [dataset[i] for i in range(min(n, len(dataset)))]
    hint = torch.stack([it["conditioning_image"] for it in items])
    caps = [it["caption"] for it in items]
    rows = [hint * 2 - 1]
    for control in ([Control(controlnet, hint)], None):
        rows.append(text_to_image(bundle, caps, steps=20, guidance_scale=3.0, seed=0, height=dataset.resolution,
                                  width=dataset.resolution, control=control))
    side = dataset.resolution
    sheet = Image.new("RGB", (n * side, len(rows) * side), "white")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            sheet.paste(Image.fromarray(array), (c * side, r * side))
    path = out / "grid.png"
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST).save(path)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="controlnet-shapes-"))
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "adapter=controlnet", "data=shapes_silhouette",
           f"model.pretrained={args.base}", "adapter.hint_channels=[16,32,64]", f"trainer.max_steps={args.steps}",
           f"paths.run_dir={out / 'run'}", f"hydra.run.dir={out / 'run' / 'hydra'}",
           f"paths.cache_dir={out / 'cache'}", "trainer.enable_progress_bar=false", *args.overrides]
    print("training:", " ".join(cmd[1:]), flush=True)
    timing = run_timed(cmd, args.threads, out / "train.log")
    print(f"training: wall {timing['wall_s'] / 60:.1f} min, process CPU {timing['cpu_s'] / 60:.1f} min", flush=True)

    from ldm.formats.controlnet_file import read_controlnet
    from ldm.formats.load import load_bundle
    from ldm.tasks.shapes.silhouette import SilhouetteShapesDataset, evaluate_silhouettes

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.base)
    controlnet = read_controlnet(out / "run" / "controlnet").eval()
    dataset = SilhouetteShapesDataset(size=args.n, resolution=args.resolution, seed=1)
    with torch.no_grad():
        result = evaluate_silhouettes(bundle, controlnet, dataset, n=args.n)
        result["grid"] = str(grid(bundle, controlnet, dataset, out))
    result.update(timing)
    print(f"\n| {args.n} fresh items | IoU with the silhouette | colour correct | shape correct |\n|---|---|---|---|")
    for name in ("with", "without"):
        r = result[name]
        print(f"| {name} the ControlNet | {r['iou']:.3f} | {100 * r['color_acc']:.1f}% | "
              f"{100 * r['shape_acc']:.1f}% |")
    print(f"grid (control | with | without): {result['grid']}")
    (out / "result.json").write_text(json.dumps(result, indent=1))
    append_jsonl(args.json, [{"bench": "controlnet_shapes", **{k: v for k, v in result.items() if k != "grid"}}])
    return result


if __name__ == "__main__":
    main()
