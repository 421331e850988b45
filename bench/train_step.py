"""U-Net training-step throughput: ldm's UNet vs diffusers' UNet2DConditionModel with the same weights.

One step = forward on a noised latent batch + eps MSE + backward + AdamW step (fused on CUDA), in fp32 on CPU or
under bf16 autocast on CUDA (fp32 master weights). Both models see the same batch and alternate in rounds within
one process; the table gives img/s, peak memory of a step (CUDA) or RSS peak delta (CPU), FLOPs per image from
torch's FlopCounterMode, MFU against --peak-tflops, and the ratio ldm/diffusers.

    python bench/train_step.py                                   # CPU: tiny preset, 64 px, batch 8
    python bench/train_step.py --preset sd15 --resolution 512 --batch 8 --channels-last   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402

CPU_DEFAULTS = dict(preset="tiny", resolution=64, batch=8, rounds=5, steps=5, warmup=3)
CUDA_DEFAULTS = dict(preset="sd15", resolution=512, batch=8, rounds=5, steps=5, warmup=3)


def parse_args(argv=None):
    p = common.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--context-len", type=int, default=77, help="text tokens (77 for CLIP)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"device peak for MFU; default {common.H100_BF16_DENSE_TFLOPS} (H100 bf16) on CUDA")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--optimizer", choices=["fused", "foreach", "for-loop"], default="fused",
                   help="AdamW implementation (fused also runs on CPU since torch 2.4: ~7x faster than for-loop)")
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    return p.parse_args(argv)


def make_batch(cfg: dict, args, device: torch.device):
    """A fixed noised batch (x_t, t, context, eps target), the same for both implementations."""
    from ldm.diffusion.process import q_sample
    from ldm.diffusion.schedules import NoiseSchedule

    g = torch.Generator().manual_seed(args.seed + 1)
    h = args.resolution // 8
    x0 = torch.randn(args.batch, cfg["in_channels"], h, h, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    x_t = q_sample(NoiseSchedule.make("scaled_linear"), x0, t, noise).float()
    ctx = torch.randn(args.batch, args.context_len, cfg["context_dim"], generator=g)
    batch = dict(x=x_t, t=t, context=ctx, target=noise)
    batch = {k: v.to(device) for k, v in batch.items()}
    if args.channels_last:
        batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
    return batch


def make_optimizer(params, lr: float, kind: str = "fused") -> torch.optim.Optimizer:
    options = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[kind]
    return torch.optim.AdamW(params, lr=lr, **options)


def make_step(call, model: torch.nn.Module, batch: dict, device: torch.device, precision: str, lr: float,
              optimizer: str = "fused"):
    """The training step as a closure. No host syncs: the loss stays on the device."""
    opt = make_optimizer(model.parameters(), lr, optimizer)
    x, t, ctx, target = batch["x"], batch["t"], batch["context"], batch["target"]

    def forward_backward():
        with common.autocast(device, precision):
            out = call(x, t, ctx)  # (B, 4, h, w)
        loss = F.mse_loss(out.float(), target)  # eps-prediction MSE
        loss.backward()
        return loss

    def step():
        loss = forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, forward_backward


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.fill_defaults(args, device, CPU_DEFAULTS, CUDA_DEFAULTS)
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = common.H100_BF16_DENSE_TFLOPS
    impls = common.parse_impls(args.impls)
    torch.manual_seed(args.seed)

    ours, ref = common.unet_pair(args.preset, device, args.seed, want_diffusers="diffusers" in impls)
    models = {"ldm": ours, "diffusers": ref}
    calls = {"ldm": ours, "diffusers": common.DiffusersAdapter(ref) if ref is not None else None}
    if args.gradient_checkpointing:
        ours.gradient_checkpointing = True
        if ref is not None:
            ref.enable_gradient_checkpointing()
    for name in impls:
        models[name].train()
        if args.channels_last:
            models[name].to(memory_format=torch.channels_last)
    batch = make_batch(ours.config, args, device)

    # same weights, same batch -> same output (before any optimizer step)
    diff = None
    if len(impls) == 2:
        with torch.no_grad(), common.autocast(device, args.precision):
            diff = (calls["ldm"](batch["x"], batch["t"], batch["context"]).float()
                    - calls["diffusers"](batch["x"], batch["t"], batch["context"]).float()).abs().max().item()

    flops = {}
    for name in impls:  # FLOPs of forward + backward, eager (before compiling)
        _, fb = make_step(calls[name], models[name], batch, device, args.precision, args.lr)
        flops[name] = common.count_flops(fb) / args.batch
        models[name].zero_grad(set_to_none=True)

    steps = {}
    for name in impls:
        call = torch.compile(calls[name]) if args.compile else calls[name]
        steps[name], _ = make_step(call, models[name], batch, device, args.precision, args.lr, args.optimizer)
    timing = common.alternate(steps, device, args.rounds, args.steps, args.warmup)
    memory, syncs = {}, {}
    for name in impls:
        with common.peak_memory(device) as mem:
            steps[name]()
        memory[name] = mem
        syncs[name] = common.count_host_syncs(steps[name], device)

    variant = "+".join(v for v, on in (("compile", args.compile), ("channels_last", args.channels_last),
                                       ("grad_ckpt", args.gradient_checkpointing)) if on) or "eager"
    rows = []
    for name in impls:
        img_s = args.batch / timing[name]["median"]
        tflops = flops[name] * img_s / 1e12
        rows.append({
            "bench": "train_step", "label": args.label, "impl": name, "preset": args.preset,
            "res": args.resolution, "batch": args.batch, "precision": args.precision, "variant": variant,
            "img/s": img_s, "ms/step": 1e3 * timing[name]["median"], "ms/step min": 1e3 * timing[name]["min"],
            "first call s": timing[name]["first"], "GFLOP/img": flops[name] / 1e9, "TFLOP/s": tflops,
            "MFU": common.mfu(flops[name], img_s, args.peak_tflops),
            "peak mem": common.fmt_bytes(memory[name]["bytes"]), "mem kind": memory[name]["kind"],
            "host syncs": syncs[name],
        })
    if len(impls) == 2:
        ratio = rows[0]["img/s"] / rows[1]["img/s"]
        for row in rows:
            row["ldm/diffusers"] = ratio
    print(common.env_line(device))
    print(f"train step: preset={args.preset} res={args.resolution}px (latent {args.resolution // 8}) "
          f"batch={args.batch} precision={args.precision} variant={variant} AdamW={args.optimizer} "
          f"rounds={args.rounds}x{args.steps}")
    if diff is not None:
        print(f"max |ldm - diffusers| forward output before training: {diff:.2e}")
    common.print_table(rows, ["impl", "variant", "img/s", "ms/step", "ms/step min", "first call s", "GFLOP/img",
                              "TFLOP/s", "MFU", "peak mem", "host syncs"])
    if len(impls) == 2:
        print(f"ratio ldm/diffusers img/s: {ratio:.3f}x")
    common.append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
