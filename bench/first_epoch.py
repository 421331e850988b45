"""The first epoch end to end, latent cache cold: ldm's ``train.py`` against diffusers' ``train_text_to_image.py``.

    python bench/first_epoch.py --diffusers-script train_text_to_image.py [--size encoders] [--pairs 3]

1. writes a diffusers folder with random weights (``--size encoders``, the default: SD-1.5's VAE and a CLIP
   ViT-L/14-sized text encoder with a small local tokenizer, the networks the cache build runs, and the small U-Net;
   ``sd15``: SD-1.5's U-Net too, ~15 GB and ~30 s a step in fp32 on a CPU; ``tiny``: the test presets) and a
   folder of ``--images`` JPEGs (``--source-size`` px, smooth random content, one caption each in metadata.jsonl);
2. alternates, ``--pairs`` times, the two commands on that folder with the same settings (steps, batch, resolution,
   AdamW at the same learning rate and weight decay, gradient clipping 1.0, no EMA, no warm-up, fp32, the final
   weights saved): ``python train.py model=sd15 model.pretrained=<folder> data=folder ...`` with a fresh cache
   folder each time (the cache is built in the run), and ``python train_text_to_image.py
   --pretrained_model_name_or_path <folder> --train_data_dir <images> ...`` (one process, no ``accelerate launch``;
   its datasets cache fresh each run too);
3. prints each command's wall time and the median ldm/diffusers speed ratio over the pairs (diffusers' seconds over
   ldm's: above 1, ldm is faster).

``--steps`` defaults to one epoch (images / batch). ``--warm`` also times ldm once per pair with the cache of its
previous run (nothing to encode). Without ``--diffusers-script`` only ldm runs (the tests run it so). The script is
diffusers' own (examples/text_to_image/train_text_to_image.py of the installed version); it needs ``datasets``,
``accelerate`` and ``torchvision`` (``--diffusers-path``: a folder put first on its PYTHONPATH only).
``--baseline-root <checkout>`` times that checkout's ``train.py`` (cold) in the same pairs, e.g. ldm before a change;
``--baseline-overrides`` adds train.py overrides to that command only (``--baseline-root . --baseline-overrides
data.latent_cache_dtype=float32``: this checkout with a float32 cache build).

``--precision fp32`` (the default): both train in float32 (diffusers' script then runs its frozen VAE and text
encoder in float32 too; ldm builds its cache in ``data.latent_cache_dtype``, auto: bfloat16 where the CPU computes it
natively). ``bf16``: both in bf16 mixed precision (``trainer.precision=bf16-mixed``, ``--mixed_precision=bf16``: the
script's frozen networks in bfloat16 as well).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # python bench/first_epoch.py: import ldm and bench from this checkout
    sys.path.insert(0, str(ROOT))

SIZES = {  # ldm presets of the three networks (+ U-Net overrides); the diffusers folder is written from them
    "sd15": dict(unet="sd15", vae="sd", text="sd15", unet_overrides={}),
    # what the cache build costs at full size (SD's VAE, a CLIP ViT-L/14-sized text encoder), a small U-Net (4.9M
    # parameters) that a shared 2-core machine trains several times over (SD-1.5's needs ~15 GB and ~30 s a step)
    "encoders": dict(unet="small", vae="sd", text="sd15", unet_overrides={"context_dim": 768}),
    "tiny": dict(unet="tiny", vae="tiny", text="tiny", unet_overrides={}),
}
LR, WEIGHT_DECAY = 1e-5, 1e-2
PRECISION = {"fp32": ("32", "no"), "bf16": ("bf16-mixed", "bf16")}  # ldm's trainer.precision, diffusers' flag


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-script", default=None, help="diffusers' examples/text_to_image/train_text_to_image.py")
    p.add_argument("--diffusers-path", default=None, help="a folder put first on the diffusers command's PYTHONPATH "
                   "(e.g. where a torchvision for its transforms is installed)")
    p.add_argument("--baseline-root", default=None, help="another ldm checkout (e.g. one before this change) whose "
                   "train.py is timed too, cold, in the same alternation")
    p.add_argument("--baseline-overrides", nargs="*", default=[], help="train.py overrides of the baseline only")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both trainers' training precision")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: ldm with trainer=gpu (diffusers' "
                   "script, through accelerate, takes the GPU where there is one)")
    p.add_argument("--size", choices=sorted(SIZES), default="encoders")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--source-size", type=int, default=512, help="side of the JPEGs in the folder (px)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: one epoch)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of both trainers")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--warm", action="store_true", help="also time ldm with the previous run's cache")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both commands")
    p.add_argument("--out", default=None, help="work folder (default: a new temporary one, deleted at the end)")
    p.add_argument("--json", default=None, help="append the result row to this JSON-lines file")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides after --")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# the model folder and the images


def write_model(folder: Path, size: str, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder with random weights, written by ldm's diffusers writer."""
    import torch

    from bench.common import randomize_
    from bench.latent_cache import make_text_encoder
    from ldm.diffusion.schedules import NoiseSchedule
    from ldm.formats.diffusers_folder import write_diffusers
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.bundle import ModelBundle
    from ldm.models.unet import UNet

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    preset = SIZES[size]
    unet = randomize_(UNet.from_preset(preset["unet"], **preset["unet_overrides"]), seed)
    vae = AutoencoderKL.from_preset(preset["vae"])
    bundle = ModelBundle(unet, vae, make_text_encoder(preset["text"], torch.device("cpu")),
                         NoiseSchedule.make(kind="scaled_linear"))
    write_diffusers(bundle, folder, resolution=512)
    return folder


def write_images(folder: Path, n: int, side: int, seed: int = 0) -> Path:
    """n JPEGs (smooth random colour fields with grain, like downscaled photos) + metadata.jsonl captions."""
    import numpy as np
    from PIL import Image

    if (folder / "metadata.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours, things = ["red", "green", "blue", "grey", "yellow"], ["house", "tree", "cat", "road", "boat", "lamp"]
    rows = []
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
        grain = rng.integers(-16, 17, (side, side, 3))
        Image.fromarray((np.asarray(field).astype(np.int16) + grain).clip(0, 255).astype(np.uint8)).save(
            folder / f"{i:05d}.jpg", quality=90)
        rows.append({"file_name": f"{i:05d}.jpg",
                     "text": f"a {colours[i % 5]} {things[(i // 5) % 6]} number {i}"})  # every caption different
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


# -----------------------------------------------------------------------------
# the two commands


def ldm_command(model: Path, images: Path, run: Path, cache: Path, args, root: Path = ROOT,
                extra: tuple[str, ...] = ()) -> list[str]:
    preset = SIZES[args.size]
    trainer = ["trainer=gpu", "trainer.devices=1"] if args.device == "cuda" else []
    return [sys.executable, str(root / "train.py"), "model=sd15", *trainer, f"model.unet.name={preset['unet']}",
            *[f"+model.unet.{k}={v}" for k, v in preset["unet_overrides"].items()],
            f"model.autoencoder.preset={preset['vae']}", f"model.pretrained={model}",
            f"model.text_encoder.path_or_hub_id={model}", "model.text_encoder.subfolder_layout=true",
            "data=folder", f"data.train.root={images}", f"data.train.resolution={args.resolution}",
            f"data.batch_size={args.batch}", f"data.num_workers={args.workers}", "data.val_fraction=0",
            f"trainer.max_steps={args.steps}", f"trainer.precision={PRECISION[args.precision][0]}",
            "trainer.gradient_clip_val=1.0",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", "lr_scheduler.warmup_steps=0",
            "module.ema_decay=null", "callbacks=none",
            "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.save_weights_only=true",
            "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints",
            f"paths.run_dir={run}", f"hydra.run.dir={run}/hydra", f"paths.cache_dir={cache}", "seed=0",
            *args.overrides, *extra]


def diffusers_command(script: Path, model: Path, images: Path, run: Path, args) -> list[str]:
    return [sys.executable, str(script), f"--pretrained_model_name_or_path={model}", f"--train_data_dir={images}",
            "--caption_column=text", f"--resolution={args.resolution}", "--center_crop",
            f"--train_batch_size={args.batch}", f"--max_train_steps={args.steps}", f"--learning_rate={LR}",
            f"--adam_weight_decay={WEIGHT_DECAY}", "--max_grad_norm=1.0", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", f"--mixed_precision={PRECISION[args.precision][1]}", f"--dataloader_num_workers={args.workers}",
            "--seed=0", f"--output_dir={run}", "--checkpointing_steps=1000000000", "--report_to=tensorboard"]


def flush_written(folder: Path, since: float) -> int:
    """fsync every file under ``folder`` modified at or after ``since`` (a command's outputs); returns how many."""
    count = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since - 1:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                count += 1
        except OSError:  # gone meanwhile, or not ours to open
            continue
    return count


def run_timed(command: list[str], log: Path, threads: int, path: str | None = None, root: Path = ROOT,
              cpu: list | None = None) -> float:
    """Wall seconds of one command (its output to ``log``); its CPU seconds (user + system, its child processes
    included) appended to ``cpu``; a failure stops the bench naming the log. Each run starts cold: Hugging Face
    datasets' cache (diffusers' image folder) in the run's own folder too. Each starts with no dirty pages of the one
    before (``os.sync()``, not timed: the ~700 MB a run saves would otherwise be written back during the next run)
    and ends when what it wrote is on disk (every file it wrote fsynced, timed: ldm's checkpoint writer fsyncs its
    file, diffusers' does not)."""
    paths = [path or "", str(root), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(log.with_suffix(".hf_datasets")),
           "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start, since = time.perf_counter(), time.time()
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    flush_written(log.parent, since)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if done.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{command[1]} failed (exit {done.returncode}); its log {log} ends:\n{tail}")
    return seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.steps = args.steps or max(1, args.images // args.batch)
    script = Path(args.diffusers_script).resolve() if args.diffusers_script else None
    if script is not None and not script.is_file():
        raise SystemExit(f"--diffusers-script: no file at {script}")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="first_epoch_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = write_model(work / f"model-{args.size}", args.size)
        images = write_images(work / f"images-{args.images}-{args.source_size}", args.images, args.source_size)
        print(f"{args.size} model, {args.images} images ({args.source_size} px JPEG) at {args.resolution} px, batch "
              f"{args.batch}, {args.steps} steps, {args.threads} thread(s), {args.workers} loader worker(s), "
              f"{args.precision} on {args.device}", flush=True)
        baseline = Path(args.baseline_root).resolve() if args.baseline_root else None
        times: dict[str, list[float]] = {"ldm_cold": [], "ldm_warm": [], "baseline_cold": [], "diffusers": []}
        cpu: dict[str, list[float]] = {k: [] for k in times}  # CPU seconds of the same runs
        loads: list[float] = []  # the 1-minute load average after each pair (others' jobs share the machine)
        for pair in range(args.pairs):
            run = work / f"pair{pair}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir()
            cache = run / "cache"  # fresh: the cache is built in this run
            times["ldm_cold"].append(run_timed(ldm_command(model, images, run / "ldm", cache, args),
                                               run / "ldm.log", args.threads, cpu=cpu["ldm_cold"]))
            line = f"pair {pair + 1}: ldm (cold cache) {times['ldm_cold'][-1]:.1f} s"
            if args.warm:
                times["ldm_warm"].append(run_timed(ldm_command(model, images, run / "ldm_warm", cache, args),
                                                   run / "ldm_warm.log", args.threads, cpu=cpu["ldm_warm"]))
                line += f", ldm (warm cache) {times['ldm_warm'][-1]:.1f} s"
            if baseline is not None:
                times["baseline_cold"].append(run_timed(
                    ldm_command(model, images, run / "baseline", run / "baseline_cache", args, baseline,
                                tuple(args.baseline_overrides)),
                    run / "baseline.log", args.threads, root=baseline, cpu=cpu["baseline_cold"]))
                line += f", baseline ldm (cold cache) {times['baseline_cold'][-1]:.1f} s"
            if script is not None:
                times["diffusers"].append(run_timed(diffusers_command(script, model, images, run / "diffusers",
                                                                      args), run / "diffusers.log", args.threads,
                                                     args.diffusers_path, cpu=cpu["diffusers"]))
                line += (f", diffusers {times['diffusers'][-1]:.1f} s, ratio "
                         f"{times['diffusers'][-1] / times['ldm_cold'][-1]:.2f}x")
            loads.append(os.getloadavg()[0])
            cpus = ", ".join(f"{k} {v[-1]:.1f}" for k, v in cpu.items() if v)
            print(f"{line}; CPU s: {cpus}; load {loads[-1]:.1f}", flush=True)
            if not args.out:  # keep the disk free: one pair's runs at a time
                shutil.rmtree(run, ignore_errors=True)
        row = dict(size=args.size, images=args.images, resolution=args.resolution, batch=args.batch,
                   precision=args.precision, device=args.device, baseline_overrides=args.baseline_overrides,
                   steps=args.steps, threads=args.threads, pairs=args.pairs,
                   ldm_cold_s=statistics.median(times["ldm_cold"]), loads=[round(x, 1) for x in loads],
                   **{f"{k}_cpu_s": [round(x, 1) for x in v] for k, v in cpu.items() if v},
                   **{f"{k}_wall_s": [round(x, 1) for x in v] for k, v in times.items() if v})
        if times["ldm_warm"]:
            row["ldm_warm_s"] = statistics.median(times["ldm_warm"])
        if times["baseline_cold"]:
            row["baseline_cold_s"] = statistics.median(times["baseline_cold"])
        if times["diffusers"]:
            cold = [d / c for d, c in zip(times["diffusers"], times["ldm_cold"])]
            cold_cpu = [d / c for d, c in zip(cpu["diffusers"], cpu["ldm_cold"])]
            row.update(diffusers_s=statistics.median(times["diffusers"]), cold_ratio=statistics.median(cold),
                       cold_ratios=[round(r, 3) for r in cold], cold_cpu_ratio=statistics.median(cold_cpu))
            print(f"median ratio diffusers/ldm (cold cache) over {args.pairs} pair(s): {row['cold_ratio']:.2f}x "
                  f"(CPU seconds: {row['cold_cpu_ratio']:.2f}x)")
            if times["baseline_cold"]:
                before = [d / b for d, b in zip(times["diffusers"], times["baseline_cold"])]
                row.update(baseline_ratio=statistics.median(before), baseline_ratios=[round(r, 3) for r in before])
                print(f"median ratio diffusers/baseline ldm (cold cache) over {args.pairs} pair(s): "
                      f"{row['baseline_ratio']:.2f}x")
            if times["ldm_warm"]:
                warm = [d / w for d, w in zip(times["diffusers"], times["ldm_warm"])]
                row.update(warm_ratio=statistics.median(warm), warm_ratios=[round(r, 3) for r in warm])
                print(f"median ratio diffusers/ldm (warm cache) over {args.pairs} pair(s): {row['warm_ratio']:.2f}x")
        print(json.dumps(row))
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return row
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
