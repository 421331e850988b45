"""Sampling speed: U-Net calls/s with classifier-free guidance (batch doubled) and 50-step DDIM latency.

ldm:       our UNet inside ldm.diffusion.samplers.ddim (CFG through ldm.diffusion.guidance)
diffusers: UNet2DConditionModel (same weights) inside the usual DDIMScheduler loop of StableDiffusionPipeline
Both use SD's DDIM settings (scaled_linear betas, "leading" spacing with steps_offset 1, final alpha = abar_0),
the same start noise and contexts, fp32 on CPU and bf16 weights on CUDA; rounds alternate within one process.
The final latents of the two loops are compared (max abs difference) as a check that they compute the same thing.

    python bench/sample.py                 # CPU: tiny preset, 64 px, batch 1, 50 steps
    python bench/sample.py --compile       # torch.compile both U-Nets
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402

CPU_DEFAULTS = dict(preset="tiny", resolution=64, batch=1, rounds=5, steps=10, warmup=3)
CUDA_DEFAULTS = dict(preset="sd15", resolution=512, batch=1, rounds=5, steps=10, warmup=3)


def parse_args(argv=None):
    p = common.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddim-rounds", type=int, default=2, help="timed full sampling loops per implementation")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    return p.parse_args(argv)


def sd_ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def main(argv=None) -> list[dict]:
    from ldm.diffusion.guidance import Conditioning
    from ldm.diffusion.samplers import ddim, make_timesteps
    from ldm.diffusion.schedules import NoiseSchedule

    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.fill_defaults(args, device, CPU_DEFAULTS, CUDA_DEFAULTS)
    impls = common.parse_impls(args.impls)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    ours, ref = common.unet_pair(args.preset, device, args.seed, want_diffusers="diffusers" in impls)
    models = {"ldm": ours, "diffusers": common.DiffusersAdapter(ref) if ref is not None else None}
    for name in impls:
        models[name].eval().requires_grad_(False).to(dtype)
        if args.channels_last:
            models[name].to(memory_format=torch.channels_last)
    calls = {name: torch.compile(models[name]) if args.compile else models[name] for name in impls}

    g = torch.Generator().manual_seed(args.seed + 1)
    h = args.resolution // 8
    cfg = ours.config
    noise = torch.randn(args.batch, cfg["in_channels"], h, h, generator=g).to(device, dtype)
    ctx = torch.randn(args.batch, args.context_len, cfg["context_dim"], generator=g).to(device, dtype)
    uncond = torch.randn(1, args.context_len, cfg["context_dim"], generator=g).to(device, dtype)
    if args.channels_last:
        noise = noise.contiguous(memory_format=torch.channels_last)

    # ---- U-Net calls with CFG: one call on the doubled batch [uncond, cond]
    x2 = torch.cat([noise, noise])
    t2 = torch.full((2 * args.batch,), 500.0, device=device)
    c2 = torch.cat([uncond.expand(args.batch, -1, -1), ctx])

    def unet_call(name):
        def run():
            with torch.no_grad():
                return calls[name](x2, t2, c2)
        return run

    timing = common.alternate({n: unet_call(n) for n in impls}, device, args.rounds, args.steps, args.warmup)

    # ---- 50-step DDIM with CFG
    schedule = NoiseSchedule.make("scaled_linear")
    timesteps = make_timesteps(schedule, args.ddim_steps, "leading", steps_offset=1)
    cond = Conditioning(context=ctx, uncond_context=uncond)
    results = {}

    def ldm_loop():
        results["ldm"] = ddim(calls["ldm"], noise.clone(), schedule, timesteps, cond=cond,
                              guidance_scale=args.guidance, final_alpha_one=False)

    def diffusers_loop():
        sched = sd_ddim_scheduler()
        sched.set_timesteps(args.ddim_steps, device=device)
        x = noise.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                out = calls["diffusers"](torch.cat([x, x]), t, c2)
                out_uncond, out_cond = out.chunk(2)
                eps = out_uncond + args.guidance * (out_cond - out_uncond)
                x = sched.step(eps, t, x).prev_sample
        results["diffusers"] = x

    loops = {"ldm": ldm_loop, "diffusers": diffusers_loop}
    loop_timing = common.alternate({n: loops[n] for n in impls}, device, args.ddim_rounds, 1, 1)
    diff = None
    if len(impls) == 2:
        a, b = results["ldm"].float(), results["diffusers"].float()
        diff = ((a - b).abs().max() / b.abs().max()).item()

    variant = "+".join(v for v, on in (("compile", args.compile), ("channels_last", args.channels_last)) if on)
    variant = variant or "eager"
    rows = []
    for name in impls:
        rows.append({
            "bench": "sample", "label": args.label, "impl": name, "preset": args.preset, "res": args.resolution,
            "batch": args.batch, "precision": args.precision, "variant": variant,
            "unet calls/s": 1.0 / timing[name]["median"], "ms/call": 1e3 * timing[name]["median"],
            "first call s": timing[name]["first"],
            f"ddim{args.ddim_steps} s": loop_timing[name]["median"],
            "img/s": args.batch / loop_timing[name]["median"],
        })
    if len(impls) == 2:
        call_ratio = rows[0]["unet calls/s"] / rows[1]["unet calls/s"]
        loop_ratio = rows[1][f"ddim{args.ddim_steps} s"] / rows[0][f"ddim{args.ddim_steps} s"]
        for row in rows:
            row["ldm/diffusers calls"], row["ldm/diffusers ddim"] = call_ratio, loop_ratio
    print(common.env_line(device))
    print(f"sampling: preset={args.preset} res={args.resolution}px batch={args.batch} (x2 for CFG) "
          f"precision={args.precision} variant={variant} guidance={args.guidance}")
    if diff is not None:
        print(f"final latents, max |ldm - diffusers| / max |diffusers|: {diff:.2e}")
    common.print_table(rows, ["impl", "variant", "unet calls/s", "ms/call", "first call s",
                              f"ddim{args.ddim_steps} s", "img/s"])
    if len(impls) == 2:
        print(f"ratio ldm/diffusers U-Net calls/s: {call_ratio:.3f}x")
        print(f"ratio ldm/diffusers DDIM-{args.ddim_steps} speed (1/latency): {loop_ratio:.3f}x")
    common.append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
