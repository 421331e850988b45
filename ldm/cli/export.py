"""Export a trained model for other tools, and our own compact bundle (``ldm-export`` is the same command).

    python -m ldm.cli.export <checkpoint or model> --format {diffusers,single-file,ldm} --out <path>
        [--raw] [--dtype fp32|fp16|bf16] [--no-frozen] [--force] [--resolution N] [--text-encoder FOLDER]

- ``diffusers``: a ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/`` with the training schedule), safetensors weights;
- ``single-file``: an original-layout SD ``.safetensors`` plus its ``v1/v2-inference.yaml``-style config next to it
  (SDXL: SGM layout ``conditioner.embedders.*`` and an ``sd_xl_base.yaml``-style config) for ComfyUI, A1111,
  diffusers' ``from_single_file``;
- ``ldm``: a folder ``load_ldm_bundle`` (and ``ldm.formats.load.load_bundle`` / ``sample.py``) rebuilds exactly.

The input is a training checkpoint (EMA U-Net unless ``--raw``) or anything ``ldm.formats.load.load_bundle`` reads.
"""

from __future__ import annotations

import argparse
import sys

from ldm.formats.exporter import DTYPES, FORMATS, export
from ldm.formats.common import ExportError


def build_parser(prog: str = "python -m ldm.cli.export") -> argparse.ArgumentParser:
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


def main(argv: list[str] | None = None, prog: str = "python -m ldm.cli.export") -> int:
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
