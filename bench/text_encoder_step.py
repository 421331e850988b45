"""CPU seconds of one stage-2 training step of experiment=own_data: the tiny CLIP frozen with cached contexts (the
previous default) vs trainable from the caption vocabulary (the default now: encoded and backpropagated every step).

Builds the LatentDiffusion module of ``experiment=own_data`` on a glyph folder (with the shapes VAE: the VAE does
not run in a cached step), then times ``--steps`` optimizer steps (loss, backward, AdamW, EMA) on a batch of latents
and captions as the latent cache serves them, measuring this process's CPU time (``time.process_time``, all
threads) with ``--threads`` torch threads; the arms alternate in ``--rounds`` rounds and the median is reported.

    python bench/text_encoder_step.py            # batch 64, 10 steps x 3 rounds per arm (~2 CPU-min)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None)
    return p.parse_args(argv)


def build(folder: Path, cache: Path, frozen: bool):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldm.training.run.caption_vocab import resolve_caption_vocab
    from ldm.training.run.config import register_configs
    from ldm.training.run.train import build_diffusion_module

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=own_data", f"data.train.root={folder}", "data.train.resolution=32",
            "model.autoencoder.weights=builtin:shapes_vae", f"paths.cache_dir={cache}",
            f"model.text_encoder.frozen={str(frozen).lower()}"])
    resolve_caption_vocab(cfg)
    return build_diffusion_module(cfg)


def time_steps(module, batch: dict, steps: int) -> float:
    """CPU seconds per optimizer step (training_step + backward + the step + EMA, as the Lightning loop runs it)."""
    import torch

    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module.train()
    start = time.process_time()
    for _ in range(steps):
        loss = module.step_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.trained_parameters(), 1.0)
        optimizer.step()
        module.part.update_ema()
    return (time.process_time() - start) / steps


def main(argv=None) -> dict:
    import torch

    from ldm.tasks.glyphs.dataset import CLASSES, TEMPLATES, write_glyph_folder

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_text_step_"))
    folder = write_glyph_folder(work / "glyphs", n=40, resolution=32, seed=0)
    captions = [TEMPLATES[i % len(TEMPLATES)].format(c=CLASSES[i % len(CLASSES)]) for i in range(args.batch)]
    latents = torch.randn(args.batch, 4, 8, 8)
    arms = {"frozen, cached contexts": build(folder, work / "cache", frozen=True),
            "trainable, caption vocabulary": build(folder, work / "cache", frozen=False)}
    frozen = arms["frozen, cached contexts"]
    with torch.no_grad():
        contexts = frozen.text_encoder(captions)
    batches = {"frozen, cached contexts": {"latents": latents, "caption": captions, "context": contexts},
               "trainable, caption vocabulary": {"latents": latents, "caption": captions}}
    for name, module in arms.items():  # warm-up
        time_steps(module, batches[name], 2)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.rounds):
        for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
            seconds[name].append(time_steps(arms[name], batches[name], args.steps))
    row = {name: statistics.median(s) for name, s in seconds.items()}
    for name, s in row.items():
        print(f"{name:32s} {s:.3f} CPU-s per step of {args.batch} ({args.threads} thread(s))")
    a, b = row["trainable, caption vocabulary"], row["frozen, cached contexts"]
    print(f"trainable / frozen: {a / b:.2f}x")
    return row


if __name__ == "__main__":
    main()
