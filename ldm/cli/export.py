"""Export a trained model for other tools, and our own compact bundle (``ldm-export`` is the same command).

    python -m ldm.cli.export <checkpoint or model> --format {diffusers,single-file,ldm} --out <path>
        [--raw] [--dtype fp32|fp16|bf16] [--no-frozen] [--force] [--allow-unloadable] [--resolution N]
        [--text-encoder FOLDER]
        [--merge-lora FILE[:SCALE]] [--verify [--verify-prompt TEXT] [--verify-device DEVICE]]

- ``diffusers``: a ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/`` with the training schedule), safetensors weights; an SD3 / MMDiT model as a
  ``StableDiffusion3Pipeline`` folder, a Flux model as a ``FluxPipeline`` (FLUX.1) folder (``transformer/``, ``vae/``,
  ``text_encoder/`` + ``text_encoder_2/`` and their tokenizers, ``scheduler/``);
- ``single-file``: an original-layout SD ``.safetensors`` plus its ``v1/v2-inference.yaml``-style config next to it
  (SDXL: SGM layout ``conditioner.embedders.*`` and an ``sd_xl_base.yaml``-style config) for ComfyUI, A1111,
  diffusers' ``from_single_file``; refused for a model ComfyUI cannot load as what it is
  (``ldm.formats.comfyui_check``) unless ``--allow-unloadable``;
- ``ldm``: a folder ``load_ldm_bundle`` (and ``ldm.formats.load.load_bundle`` / ``sample.py``) rebuilds exactly.

The input is a training checkpoint (EMA U-Net unless ``--raw``) or anything ``ldm.formats.load.load_bundle`` reads.

``--verify``: reload the export as its consumers do (ours; diffusers' from_pretrained / from_single_file /
load_lora_weights when installed) and compare seeded samples with ldm's samples of the source
(``ldm.evaluation.export_check``). Exit status: 0 written (and verified), 1 not written, 3 written but a consumer's
samples differ beyond the tolerance of the export's dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.formats.exporter import DTYPES, FORMATS, check_overwrite, export, load_source, output_paths
from ldm.formats.common import ExportError

VERIFY_FAILED = 3  # the export was written, but it does not sample like the source


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
    p.add_argument("--allow-unloadable", action="store_true",
                   help="single-file: write it even when ComfyUI cannot load it as the model it is (a non-SD size, "
                        "another head count, schedule or latent scale); without it such a model is refused")
    p.add_argument("--resolution", type=int, default=None,
                   help="training image size for the configs (default: what the source records, else 512)")
    p.add_argument("--merge-lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="bake a LoRA file (ours, kohya's or diffusers') into the exported weights; repeatable")
    p.add_argument("--text-encoder", default=None,
                   help="folder with tokenizer/ + text_encoder/ (SD single-file sources carry no tokenizer)")
    p.add_argument("--verify", action="store_true",
                   help="after writing, reload the export as its consumers do (ours; diffusers when installed) and "
                        "compare seeded samples with the source's; exit 3 when they differ beyond the tolerance")
    p.add_argument("--verify-prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt for --verify's samples (repeatable; default: two fixed prompts)")
    p.add_argument("--verify-device", default="auto", help="device for --verify's samples (default: cuda if any)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m ldm.cli.export") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.verify and not args.frozen:
        parser.error("--verify samples the exported model: it needs the VAE and text encoder (drop --no-frozen)")
    try:
        source = args.source
        if args.verify:  # loaded here: the model before any --merge-lora is the base that load_lora_weights needs
            settings = verify_settings(args)  # a wrong device or prompt fails before anything is written
            check_overwrite(output_paths(args.fmt, Path(args.out).expanduser().absolute()),
                            args.fmt != "single-file", args.force)  # before the (slow) load, as export() does
            source = load_source(args.source, use_ema=not args.raw, text_encoder=args.text_encoder)
        result = export(source, args.fmt, args.out, raw=args.raw, dtype=args.dtype, frozen=args.frozen,
                        force=args.force, resolution=args.resolution, text_encoder=args.text_encoder, log=print,
                        merge_lora=args.merge_lora, allow_unloadable=args.allow_unloadable)
        if args.verify:
            return verify(result, source, args.merge_lora, settings)
    except (ExportError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def verify_settings(args: argparse.Namespace):
    from ldm.evaluation.export_check import DEFAULT_PROMPTS, VerifySettings

    settings = VerifySettings(prompts=tuple(args.verify_prompt) or DEFAULT_PROMPTS, device=args.verify_device)
    settings.torch_device()
    return settings


def verify(result, base, merge_lora: list[str], settings) -> int:
    """Compare the export's samples in each consumer with the source's; 0 when all agree, else VERIFY_FAILED."""
    from ldm.evaluation.export_check import verify_export

    report = verify_export(result, base=base, merge_lora=merge_lora, settings=settings, log=print)
    if report.passed:
        print(report.verdict())
        return 0
    print(report.verdict(), file=sys.stderr)
    print(f"error: the export at {result.paths[0]} does not sample like its source (kept for inspection)",
          file=sys.stderr)
    return VERIFY_FAILED


if __name__ == "__main__":
    sys.exit(main())
