"""The LoRA tools on the command line (``python -m ldm.lora``; the work is in ``ldm.cli.lora_tools``):

    python -m ldm.lora merge A.safetensors:0.7 B.safetensors:0.5 --model MODEL --out M.safetensors
        (--rank R [--conv-rank R] [--clamp-quantile Q] | --concat)
    python -m ldm.lora resize IN.safetensors --model MODEL --rank R [--conv-rank R]
        [--dynamic sv_ratio|sv_fro|sv_cumulative --value X] --out OUT.safetensors
    python -m ldm.lora extract --base BASE --tuned TUNED --rank R [--conv-rank R] [--preset P] [--text-encoder]
        [--clamp-quantile Q] [--min-diff D] [--device DEVICE] --out OUT.safetensors

MODEL / BASE / TUNED: anything ``ldm.formats.load.load_bundle`` reads (our checkpoints and bundles, diffusers
folders, SD single files). Adapter files: ours, kohya's, diffusers' (safetensors). Exit status 0 written, 1 not.
"""

from __future__ import annotations

import argparse
import sys

from ldm.models.lora import PRESETS
from ldm.models.lora_svd import DYNAMIC


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a rank is a positive integer, got {value}")
    return value


def build_parser(prog: str = "python -m ldm.lora") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Merge, resize and extract LoRA adapters (kohya-layout "
                                                       ".safetensors out; kohya sd-scripts' svd_merge_lora.py, "
                                                       "resize_lora.py and extract_lora_from_models.py behaviours).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{merge,resize,extract}")

    def common(s, model: bool = True):
        if model:
            s.add_argument("--model", required=True,
                           help="the model the adapters are for (checkpoint, bundle, diffusers folder, SD file): "
                                "files are read against its layers")
        s.add_argument("--out", required=True, help="the adapter to write (.safetensors, kohya layout)")
        s.add_argument("--force", action="store_true", help="replace --out if it exists")

    m = sub.add_parser("merge", help="several adapters into one, at given weights")
    m.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT]", help="adapter files and their weights (default 1)")
    how = m.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=positive_int, help="SVD of the summed deltas to this rank per layer")
    how.add_argument("--concat", action="store_true",
                     help="exact: stack the adapters' factors (rank = the sum of their ranks)")
    m.add_argument("--conv-rank", type=positive_int, help="rank of 3x3 convs with --rank (default: --rank)")
    m.add_argument("--clamp-quantile", type=float, help="clamp the factors at this quantile (kohya: 0.99)")
    common(m)

    r = sub.add_parser("resize", help="change an adapter's rank by SVD, printing the kept energy")
    r.add_argument("lora", metavar="FILE[:WEIGHT]", help="the adapter to resize")
    r.add_argument("--rank", type=positive_int, required=True, help="the new rank (the cap with --dynamic)")
    r.add_argument("--conv-rank", type=positive_int, help="rank of 3x3 convs (default: --rank)")
    r.add_argument("--dynamic", choices=DYNAMIC, help="choose each layer's rank by its singular values")
    r.add_argument("--value", type=float,
                   help="--dynamic's target: sv_ratio s_max/s_min kept (>= 1); sv_fro, sv_cumulative the fraction")
    common(r)

    e = sub.add_parser("extract", help="an adapter from the difference of two models (tuned - base)")
    e.add_argument("--base", required=True, help="the model before fine-tuning")
    e.add_argument("--tuned", required=True, help="the fine-tuned model")
    e.add_argument("--rank", type=positive_int, required=True, help="rank of each adapted layer")
    e.add_argument("--conv-rank", type=positive_int, help="rank of the 3x3 convs (LoCon; implies --preset full)")
    e.add_argument("--preset", choices=PRESETS,
                   help="layers to adapt (adapter.preset; default attention_ff, full with --conv-rank)")
    e.add_argument("--text-encoder", action="store_true", help="also the text encoder's attention and MLP")
    e.add_argument("--clamp-quantile", type=float, help="clamp the factors at this quantile (kohya: 0.99)")
    e.add_argument("--min-diff", type=float, default=0.0,
                   help="leave out layers whose largest |difference| is at most this (default 0: unchanged ones)")
    e.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")
    common(e, model=False)
    return p


def run(args: argparse.Namespace):
    from ldm.cli import lora_tools

    if args.command == "merge":
        return lora_tools.merge(args.loras, args.model, args.out, rank=args.rank, conv_rank=args.conv_rank,
                                concat=args.concat, clamp_quantile=args.clamp_quantile, force=args.force)
    if args.command == "resize":
        return lora_tools.resize(args.lora, args.model, args.out, rank=args.rank, conv_rank=args.conv_rank,
                                 dynamic=args.dynamic, value=args.value, force=args.force)
    return lora_tools.extract(args.base, args.tuned, args.out, rank=args.rank, conv_rank=args.conv_rank,
                              preset=args.preset, text_encoder=args.text_encoder,
                              clamp_quantile=args.clamp_quantile, min_diff=args.min_diff, device=args.device,
                              force=args.force)


def main(argv: list[str] | None = None, prog: str = "python -m ldm.lora") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as err:  # LoRAToolError, a file that cannot be read or written
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
