"""Optimizer memory: AdamW vs 8-bit AdamW (bitsandbytes) vs Adafactor vs Prodigy, schedule-free AdamW, Lion and CAME
on the same U-Net.

For each optimizer (the optim=adamw / adamw8bit / adafactor / prodigy / adamw_schedulefree / lion / came factories,
in that order, each on a fresh copy of the same weights): the bytes of its state tensors after the first step
(opt.state: AdamW's two fp32 moments, the 8-bit moments + their block absmax, Adafactor's row/column factors,
Prodigy's two moments + its s sum + the initial weights, schedule-free's z + second moment, Lion's one moment,
CAME's moment + factored second moment and confidence), the peak memory of the first step over what
was allocated before it (the state is allocated there; CUDA: max_memory_allocated, CPU: process RSS peak delta,
approximate), the peak of a later step, and the median step time. Ratios are against AdamW.

    python bench/optim_memory.py                          # CPU: small preset, 32 px, batch 2
    python bench/optim_memory.py --preset sd15 --resolution 512 --batch 4     # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402
from bench.train_step import make_batch  # noqa: E402

CPU_DEFAULTS = dict(preset="small", resolution=32, batch=2, steps=3)
CUDA_DEFAULTS = dict(preset="sd15", resolution=512, batch=4, steps=5)
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "adamw_schedulefree", "lion", "came")


def parse_args(argv=None):
    p = common.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of " + ", ".join(OPTIMIZERS))
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    return p.parse_args(argv)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The optimizers of configs/optim/*.yaml with their config defaults (lr from the command line; Prodigy's is
    1.0, the multiplier of its own estimate); a schedule-free one in train mode, as training steps it."""
    from ldm.training.build import optimizers

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    if name == "adamw8bit":
        return optimizers.adamw8bit(params, lr=lr, weight_decay=0.01)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr)
    if name == "prodigy":
        return optimizers.prodigy(params, lr=1.0, weight_decay=0.01, use_bias_correction=True, safeguard_warmup=True)
    if name == "adamw_schedulefree":
        opt = optimizers.adamw_schedulefree(params, lr=lr, weight_decay=0.01)
        opt.train()
        return opt
    if name == "lion":
        return optimizers.lion(params, lr=lr, weight_decay=0.1)
    if name == "came":
        return optimizers.came(params, lr=lr, weight_decay=0.01)
    raise SystemExit(f"--optimizers takes {', '.join(OPTIMIZERS)}, got {name!r}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.ndim > 0)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.fill_defaults(args, device, CPU_DEFAULTS, CUDA_DEFAULTS)
    names = [n for n in args.optimizers.split(",") if n]
    torch.manual_seed(args.seed)
    base, _ = common.unet_pair(args.preset, device, args.seed, want_diffusers=False)
    base.train()
    batch = make_batch(base.config, args, device)
    params = sum(p.numel() for p in base.parameters())
    rows = []
    for name in names:
        unet = copy.deepcopy(base)
        opt = make_optimizer(name, unet.parameters(), args.lr)

        def step():
            with common.autocast(device, args.precision):
                out = unet(batch["x"], batch["t"], batch["context"])
            F.mse_loss(out.float(), batch["target"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with common.peak_memory(device) as first:
            step()  # the optimizer state is allocated here
        with common.peak_memory(device) as later:
            step()
        times = []
        for _ in range(args.steps):
            common.sync(device)
            t0 = time.perf_counter()
            step()
            common.sync(device)
            times.append(time.perf_counter() - t0)
        rows.append({"bench": "optim_memory", "label": args.label, "optimizer": name, "preset": args.preset,
                     "params": params, "state bytes": state_bytes(opt),
                     "state": common.fmt_bytes(state_bytes(opt)),
                     "state B/param": state_bytes(opt) / params,
                     "first step peak": common.fmt_bytes(first["bytes"]), "first peak bytes": first["bytes"],
                     "step peak": common.fmt_bytes(later["bytes"]), "mem kind": first["kind"],
                     "ms/step": 1e3 * statistics.median(times)})
        del unet, opt
    ref = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for row in rows:
        if ref is not None:
            row["state / adamw"] = row["state bytes"] / ref["state bytes"]
            row["first peak / adamw"] = row["first peak bytes"] / ref["first peak bytes"]
    print(common.env_line(device))
    print(f"optimizer memory: preset={args.preset} ({params / 1e6:.1f}M parameters) res={args.resolution}px "
          f"batch={args.batch} precision={args.precision}")
    common.print_table(rows, ["optimizer", "state", "state B/param", "state / adamw", "first step peak",
                              "first peak / adamw", "step peak", "ms/step"])
    common.append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
