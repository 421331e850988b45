"""``python -m ldm.export`` (also the ``ldm-export`` console script): see ``ldm.export``."""

from __future__ import annotations

import argparse
import sys

from ldm.export.core import DTYPES, FORMATS, export
from ldm.export.formats import ExportError


def build_parser(prog: str = "python -m ldm.export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a training checkpoint (or any model ldm loads) as a diffusers folder, an original "
                    "Stable Diffusion single file + yaml, or an ldm bundle.")
    p.add_argument("source",
                   help="training .ckpt, ldm bundle folder, SD .safetensors/.ckpt, diffusers folder or hub id")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="output format")
    p.add_argument("--out", required=True, help="output folder (diffusers, ldm) or .safetensors file (single-file)")
    p.add_argument("--raw", action="store_true", help="export the raw U-Net weights instead of the EMA copy")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written weights")
    p.add_argument("--no-frozen", dest="frozen", action="store_false",
                   help="leave out the frozen VAE and text encoder (write the U-Net only)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--resolution", type=int, default=None,
                   help="training image size for the configs (default: what the source records, else 512)")
    p.add_argument("--merge-lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="bake a LoRA file (ours, kohya's or diffusers') into the exported weights; repeatable")
    p.add_argument("--text-encoder", default=None,
                   help="folder with tokenizer/ + text_encoder/ (SD single-file sources carry no tokenizer)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m ldm.export") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        export(args.source, args.fmt, args.out, raw=args.raw, dtype=args.dtype, frozen=args.frozen,
               force=args.force, resolution=args.resolution, text_encoder=args.text_encoder, log=print,
               merge_lora=args.merge_lora)
    except (ExportError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
