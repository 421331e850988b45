"""``python -m ldm.cli.latent_cache OUT --source ... [--vae-weights ...] [--text-encoder ...]``: encode a dataset once
into VAE latents (+ text contexts); the library is ``ldm.data.latent_cache`` (layout and resume rules there).
Running the same command again resumes an interrupted run (finished shards are skipped)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Iterable

import torch

from ldm.data.latent_cache import DTYPES, STORES, TEXTS, build_latent_cache
from ldm.formats.shared_names import shared_config

logger = logging.getLogger("ldm.data")



def _parse_json(text: str | None) -> dict:
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise SystemExit(f"--source-kwargs must be a JSON object, got {text!r}")
    return value


def make_source(kind: str, path: str | None, resolution: int, size: int, seed: int, caption_column: str | None,
                image_column: str, split: str, extra: dict):
    """A data source from command-line values: the shapes task, an `ldm.data` source, or `module:callable`."""
    if kind == "shapes":
        from ldm.tasks.shapes.dataset import ShapesDataset

        return ShapesDataset(size=size, resolution=resolution, seed=seed, **extra)
    if kind in ("folder", "hf", "webdataset") and not path:
        raise SystemExit(f"--source {kind} needs --path")
    if kind == "folder":
        from ldm.data.image_folder import ImageFolderDataset

        return ImageFolderDataset(path, resolution=resolution, caption_column=caption_column or "text", **extra)
    if kind == "hf":
        from ldm.data.hf_dataset import HFDataset

        return HFDataset(path, split=split, image_column=image_column, caption_column=caption_column,
                         resolution=resolution, **extra)
    if kind == "webdataset":
        from ldm.data.webdataset import WebDatasetSource

        # a fixed order, so that an interrupted run can resume
        options = dict(shuffle_buffer=0, shuffle_shards=False, **extra)
        return WebDatasetSource(path, resolution=resolution, **options)
    if ":" in kind:
        import importlib

        module, _, attr = kind.partition(":")
        factory = importlib.import_module(module)
        for part in attr.split("."):
            factory = getattr(factory, part)
        return factory(**extra)
    raise SystemExit(f"unknown --source {kind!r}: shapes, folder, hf, webdataset or module:callable")


def make_vae(preset: str, weights: str | None):
    """Our AutoencoderKL from a preset, filled from an SD single file, our own safetensors or a diffusers folder."""
    from ldm.formats.autoencoder_file import load_autoencoder
    from ldm.models.autoencoder import AutoencoderKL

    if weights is None:
        logger.warning("no --vae-weights: the %s VAE has RANDOM weights (only useful for tests and benchmarks)",
                       preset)
        return AutoencoderKL.from_preset(preset)
    return load_autoencoder(weights, preset)


def make_text_encoder(spec: str, penultimate: bool):
    if spec == "none":
        return None
    from ldm.models import tiny_clip
    from ldm.models.text_encoder import CLIPTextEncoder

    if spec in tiny_clip.PRESETS:
        logger.warning("--text-encoder %s: a tiny RANDOM CLIP (only useful for tests and benchmarks)", spec)
        return CLIPTextEncoder.from_tiny(spec)
    return CLIPTextEncoder.from_pretrained(spec, penultimate=penultimate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ldm.cli.latent_cache",
        description="Encode a dataset once into VAE latents (+ text contexts) in safetensors shards. Running the "
                    "same command again resumes an interrupted run (finished shards are skipped).",
    )
    p.add_argument("out", help="output folder (manifest.json + shard-*.safetensors)")
    g = p.add_argument_group("data source")
    g.add_argument("--source", default="shapes",
                   help="shapes | folder | hf | webdataset | module:callable (called with --source-kwargs)")
    g.add_argument("--path", help="image folder, HF dataset name / saved folder, or shard pattern")
    g.add_argument("--resolution", type=int, default=256, help="image side after resize + crop")
    g.add_argument("--size", type=int, default=1000, help="number of samples (shapes)")
    g.add_argument("--caption-column", default="text")
    g.add_argument("--image-column", default="image")
    g.add_argument("--split", default="train")
    g.add_argument("--source-kwargs", default=None, help="JSON object of extra source arguments")
    g.add_argument("--max-samples", type=int, default=None)
    g = p.add_argument_group("encoders")
    g.add_argument("--vae-preset", default="sd", help="AutoencoderKL preset (architecture): sd, sdxl, tiny, small")
    g.add_argument("--vae-weights", default=None,
                   help="SD single file, our VAE .safetensors, or diffusers folder (with vae/)")
    g.add_argument("--text-encoder", default="none",
                   help="none (store captions), a diffusers-style folder with tokenizer/ + text_encoder/, or a "
                        "tiny preset (tiny, small: random weights)")
    g.add_argument("--penultimate", action="store_true", help="SD2-style penultimate text layer")
    g = p.add_argument_group("output")
    g.add_argument("--store", choices=STORES, default="posterior",
                   help="posterior: mean + logvar (sample every epoch); sample: one sample; mode: the mean")
    g.add_argument("--text", choices=TEXTS, default=None,
                   help="context (needs --text-encoder) or caption; default: context when a text encoder is given")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype")
    g.add_argument("--shard-size", type=int, default=1024)
    g.add_argument("--overwrite", action="store_true", help="delete an existing cache in OUT first")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:0, ...")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast the encoders")
    g.add_argument("--seed", type=int, default=0, help="shapes seed and store=sample noise seed")
    g.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Iterable[str] | None = None) -> dict:
    args = build_parser().parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    source = make_source(args.source, args.path, args.resolution, args.size, args.seed,
                         args.caption_column, args.image_column, args.split, _parse_json(args.source_kwargs))
    vae = make_vae(args.vae_preset, args.vae_weights).to(device)
    text_encoder = make_text_encoder(args.text_encoder, args.penultimate)
    if text_encoder is not None:
        text_encoder = text_encoder.to(device)
    # how the cache was made, kept in its manifest: a cache may be shared, so its paths are shareable names
    description = shared_config({k: v for k, v in vars(args).items() if k not in ("overwrite", "no_progress", "out")},
                                args.out)
    manifest = build_latent_cache(
        source, args.out, vae, text_encoder, store=args.store, text=args.text, shard_size=args.shard_size,
        batch_size=args.batch_size, num_workers=args.num_workers, dtype=args.dtype,
        amp=None if args.amp == "none" else args.amp, device=device, seed=args.seed, max_samples=args.max_samples,
        overwrite=args.overwrite, progress=not args.no_progress, description=description,
    )
    print(f"{args.out}: {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s), latents "
          f"{tuple(manifest['latent_shape'])}" + (f", context {tuple(manifest['context_shape'])}"
                                                  if manifest["context_shape"] else ""), file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
