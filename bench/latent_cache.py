"""Training throughput fed from the latent cache vs encoding every batch with the VAE and text encoder.

Both paths train the same U-Net with the same step (noised latents, eps MSE, backward, AdamW); they differ only in
where latents and text contexts come from:
  on-the-fly: DataLoader(ShapesDataset) -> VAE encode_latents (posterior sample) + text encoder -> step
  cached:     DataLoader(CachedLatentsDataset) (posterior sample per index) -> step
Rounds alternate within one process. Also printed: the one-off cache build time, VAE encode img/s, and after how
many epochs the cache has paid for itself.

    python bench/latent_cache.py        # CPU: the shapes setup (32 px, small VAE f=4 -> 8x8 latents, tiny CLIP)
    python bench/latent_cache.py --unet sd15 --vae sd --text sd15 --resolution 256 --batch 16   # GPU
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402

CPU_DEFAULTS = dict(unet="tiny", vae="small", text="tiny", resolution=32, batch=16, samples=512, rounds=4, steps=4,
                    warmup=2, workers=0)
CUDA_DEFAULTS = dict(unet="sd15", vae="sd", text="sd15", resolution=256, batch=16, samples=512, rounds=3, steps=4,
                     warmup=2, workers=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--unet", default=None, help="U-Net preset")
    p.add_argument("--vae", default=None, help="AutoencoderKL preset (sd: f=8, small: f=4, tiny: f=2)")
    p.add_argument("--text", default=None, help="text encoder: tiny | small (tiny CLIP) | sd15 (CLIP-L size)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--samples", type=int, default=None, help="dataset size (all of it is cached)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of both paths")
    p.add_argument("--dtype", default="float32", help="cache storage dtype")
    p.add_argument("--cache-dir", default=None, help="where to write the cache (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="")
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    return p.parse_args(argv)


def make_text_encoder(kind: str, device: torch.device):
    """A CLIP text encoder with random weights: the tiny presets, or CLIP ViT-L/14's size (sd15) with the tiny
    tokenizer (the cost of the network is the same; nothing is downloaded)."""
    from ldm.models import tiny_clip
    from ldm.models.text_encoder import CLIPTextEncoder

    folder = Path(tempfile.mkdtemp(prefix="bench_clip_"))
    try:
        if kind in tiny_clip.PRESETS:
            return CLIPTextEncoder.from_tiny(kind, folder=folder).to(device)
        if kind != "sd15":
            raise SystemExit(f"--text: expected tiny, small or sd15, got {kind!r}")
        from transformers import CLIPTextModel, CLIPTokenizer

        vocab = tiny_clip.write_tokenizer(folder / "tokenizer")
        config = tiny_clip.tiny_clip_config(len(vocab), vocab[tiny_clip.BOS], vocab[tiny_clip.EOS],
                                            hidden_size=768, num_layers=12, num_heads=12)
        config.intermediate_size = 3072
        with torch.device(device):
            model = CLIPTextModel(config)
        return CLIPTextEncoder(model, CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def forever(loader):
    while True:
        yield from loader


def main(argv=None) -> list[dict]:
    from ldm.data.cached_latents import CachedLatentsDataset
    from ldm.data.collate import collate_image_caption
    from ldm.data.latent_cache import build_latent_cache
    from ldm.tasks.shapes.dataset import ShapesDataset
    from ldm.diffusion.objectives import noised_batch
    from ldm.diffusion.schedules import NoiseSchedule
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.unet import UNet

    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.fill_defaults(args, device, CPU_DEFAULTS, CUDA_DEFAULTS)
    torch.manual_seed(args.seed)

    text_encoder = make_text_encoder(args.text, device)
    with torch.device(device):
        vae = AutoencoderKL.from_preset(args.vae).eval().requires_grad_(False)
        unet = UNet.from_preset(args.unet, context_dim=text_encoder.context_dim).train()
    schedule = NoiseSchedule.make("scaled_linear")
    source = ShapesDataset(size=args.samples, resolution=args.resolution, seed=args.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    amp = None if args.precision == "fp32" else args.precision

    def unet_step(latents, context):
        x_t, t, target = noised_batch(schedule, latents)
        with common.autocast(device, args.precision):
            out = unet(x_t, t, context)
        loss = F.mse_loss(out.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- the cache (one-off cost)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="bench_latent_cache_"))
    common.sync(device)
    t0 = time.perf_counter()
    build_latent_cache(source, cache_dir, vae, text_encoder, store="posterior", shard_size=256,
                       batch_size=args.batch, num_workers=args.workers, dtype=args.dtype, amp=amp, device=device,
                       overwrite=True, progress=False)
    build_s = time.perf_counter() - t0
    cache_bytes = sum(f.stat().st_size for f in cache_dir.iterdir())

    loader_kwargs = dict(batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    raw = forever(DataLoader(source, collate_fn=collate_image_caption, **loader_kwargs))
    cached = forever(DataLoader(CachedLatentsDataset(cache_dir), **loader_kwargs))

    def on_the_fly():
        batch = next(raw)
        x = batch["image"].to(device, non_blocking=True)
        with torch.no_grad(), common.autocast(device, args.precision):
            latents = vae.encode_latents(x)  # posterior sample, scaled
            context = text_encoder(batch["caption"])
        unet_step(latents.float(), context)

    def from_cache():
        batch = next(cached)
        unet_step(batch["latents"].to(device, non_blocking=True), batch["context"].to(device, non_blocking=True))

    def encode_only():
        batch = next(raw)
        with torch.no_grad(), common.autocast(device, args.precision):
            vae.encode_latents(batch["image"].to(device, non_blocking=True))

    timing = common.alternate({"on-the-fly": on_the_fly, "cached": from_cache, "vae encode": encode_only},
                              device, args.rounds, args.steps, args.warmup)
    shutil.rmtree(cache_dir, ignore_errors=True) if not args.cache_dir else None

    rate = {name: args.batch / t["median"] for name, t in timing.items()}
    ratio = rate["cached"] / rate["on-the-fly"]
    # epochs after which (build time + cached epochs) < on-the-fly epochs
    saved_per_epoch = args.samples / rate["on-the-fly"] - args.samples / rate["cached"]
    break_even = build_s / saved_per_epoch if saved_per_epoch > 0 else float("inf")
    setup = (f"unet={args.unet} vae={args.vae} text={args.text} res={args.resolution}px batch={args.batch} "
             f"precision={args.precision} workers={args.workers}")
    rows = [
        {"bench": "latent_cache", "label": args.label, "path": "on-the-fly (VAE + text encoder every step)",
         "img/s": rate["on-the-fly"], "ms/step": 1e3 * timing["on-the-fly"]["median"], "setup": setup},
        {"bench": "latent_cache", "label": args.label, "path": "cached latents + contexts",
         "img/s": rate["cached"], "ms/step": 1e3 * timing["cached"]["median"], "ratio": ratio, "setup": setup},
        {"bench": "latent_cache", "label": args.label, "path": "VAE encode only", "img/s": rate["vae encode"],
         "ms/step": 1e3 * timing["vae encode"]["median"], "setup": setup},
    ]
    print(common.env_line(device))
    print(f"latent cache: {setup}")
    print(f"cache build: {args.samples} images in {build_s:.1f}s ({args.samples / build_s:.1f} img/s), "
          f"{common.fmt_bytes(cache_bytes)} on disk; pays for itself after {break_even:.2f} epochs")
    common.print_table(rows, ["path", "img/s", "ms/step", "ratio"])
    print(f"ratio cached/on-the-fly img/s: {ratio:.3f}x")
    common.append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
