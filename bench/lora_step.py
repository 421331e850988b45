"""LoRA (and LoHa, LoKr, DoRA) vs full fine-tuning of the same U-Net: training-step time and memory.

One step = forward on a fixed noised latent batch + eps MSE + backward + AdamW step, as in train_step.py. "full"
optimises every U-Net weight; "lora" freezes the base and optimises the adapters (ldm.models.lora, --lora-preset,
--rank) added by forward hooks; "loha", "lokr", "dora" do the same with those adapter types (`--impls
full,lora,loha,lokr,dora` for all; LoKr's --factor); "lora_int8", "lora_nf4", "lora_fp8" put the LoRA on a base
whose Linear layers are stored quantized (model.quantize_base, ldm.models.quantized_base). All alternate in rounds
within one process. Columns: trainable parameters, gradient + AdamW state they need (4 bytes x 3 per fp32 parameter),
the bytes the U-Net's weights are stored in, the step's peak memory over what was allocated before it (CUDA:
max_memory_allocated; CPU: RSS peak delta, approximate). Weights are the same for all.

    python bench/lora_step.py                                     # CPU: small preset, 32 px, batch 8
    python bench/lora_step.py --preset sd15 --resolution 512 --batch 4      # on a GPU
    python bench/lora_step.py --impls full,lora,loha,lokr,dora,lora_int8,lora_nf4   # every adapter type and base
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402
from bench.train_step import make_batch, make_step  # noqa: E402

CPU_DEFAULTS = dict(preset="small", resolution=64, batch=8, rounds=5, steps=3, warmup=2)
CUDA_DEFAULTS = dict(preset="sd15", resolution=512, batch=4, rounds=5, steps=5, warmup=3)


def parse_args(argv=None):
    p = common.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--lora-preset", default="attention", help="attention | attention_ff | full")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--factor", type=int, default=-1, help="LoKr's Kronecker factor size (-1: LyCORIS's default)")
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=["fused", "foreach", "for-loop"], default="fused")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    args = p.parse_args(argv)
    args.impls = "full,lora" if args.impls == "ldm,diffusers" else args.impls
    return args


class Trainable(torch.nn.Module):
    """What the optimizer sees: the whole U-Net, or only the adapter network (the U-Net runs through hooks)."""

    def __init__(self, unet, network=None):
        super().__init__()
        self.unet, self.network = unet, network

    def parameters(self, recurse: bool = True):
        return (self.network if self.network is not None else self.unet).parameters(recurse)

    def forward(self, x, t, context):
        return self.unet(x, t, context)


def main(argv=None) -> list[dict]:
    from ldm.models.lora import TYPES, LoRAConfig, LoRANetwork
    from ldm.models.quantized_base import PRECISIONS, quantize_base_, stored_bytes

    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.fill_defaults(args, device, CPU_DEFAULTS, CUDA_DEFAULTS)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    impls = [i for i in args.impls.split(",") if i]
    quantized = {f"lora_{p}": p for p in PRECISIONS}
    if set(impls) - {"full", *TYPES, *quantized}:
        raise SystemExit(f"--impls takes full,{','.join([*TYPES, *quantized])}, got {args.impls}")
    torch.manual_seed(args.seed)
    models = {}
    for name in impls:
        unet, _ = common.unet_pair(args.preset, device, args.seed, want_diffusers=False)
        unet.gradient_checkpointing = args.gradient_checkpointing
        unet.train()
        network = None
        if name != "full":
            unet.requires_grad_(False)
            if name in quantized:  # the frozen base's Linear layers stored quantized, a LoRA on top
                quantize_base_(unet, quantized[name])
            config = LoRAConfig(type="lora" if name in quantized else name, preset=args.lora_preset,
                                rank=args.rank, factor=args.factor)
            network = LoRANetwork.build({"unet": unet}, config)
            network.to(device).attach({"unet": unet})
        models[name] = Trainable(unet, network)
    batch = make_batch(models[impls[0]].unet.config, args, device)
    steps = {name: make_step(models[name], models[name], batch, device, args.precision, args.lr, args.optimizer)[0]
             for name in impls}
    cpu = {name: [0.0, 0] for name in impls}  # process CPU seconds and calls per impl: on a shared CPU the wall
    # time of a step mostly measures the other processes; the CPU time it used does not

    def counted(name, fn):
        def call():
            t0 = time.process_time()
            out = fn()
            cpu[name][0] += time.process_time() - t0
            cpu[name][1] += 1
            return out
        return call

    timing = common.alternate({n: counted(n, f) for n, f in steps.items()}, device, args.rounds, args.steps,
                              args.warmup)
    cpu_s = sum(c[0] for c in cpu.values())
    rows = []
    for name in impls:
        with common.peak_memory(device) as mem:
            steps[name]()
        trainable = sum(p.numel() for p in models[name].parameters())
        row = {"bench": "lora_step", "label": args.label, "impl": name, "preset": args.preset,
               "lora": f"{args.lora_preset} r{args.rank}" if name != "full" else "-", "res": args.resolution,
               "batch": args.batch, "precision": args.precision,
               "ms/step": 1e3 * timing[name]["median"], "ms/step min": 1e3 * timing[name]["min"],
               "CPU ms/step": 1e3 * cpu[name][0] / max(cpu[name][1], 1),
               "img/s": args.batch / timing[name]["median"], "trainable": trainable,
               "grad+AdamW": common.fmt_bytes(trainable * 4 * 3), "step peak": common.fmt_bytes(mem["bytes"]),
               "base bytes": stored_bytes(models[name].unet),
               "mem kind": mem["kind"]}
        row["base weights"] = common.fmt_bytes(row["base bytes"])
        rows.append(row)
    full = next((r for r in rows if r["impl"] == "full"), None)
    for row in rows if full else []:  # every row against full fine-tuning
        row["time/full"] = row["ms/step"] / full["ms/step"]
        row["CPU/full"] = row["CPU ms/step"] / full["CPU ms/step"]
    if len(rows) == 2:
        for row in rows:
            row["lora/full time"] = rows[1]["ms/step"] / rows[0]["ms/step"]
            row["lora/full CPU"] = rows[1]["CPU ms/step"] / rows[0]["CPU ms/step"]
    print(common.env_line(device))
    print(f"lora vs full: preset={args.preset} res={args.resolution}px batch={args.batch} precision={args.precision} "
          f"rounds={args.rounds}x{args.steps}; process CPU time of all steps {cpu_s:.1f} s")
    common.print_table(rows, ["impl", "lora", "ms/step", "ms/step min", "CPU ms/step", "img/s", "trainable",
                              "grad+AdamW", "base weights", "step peak", *(["CPU/full"] if full else [])])
    if len(rows) == 2:
        print(f"step time lora/full: {rows[0]['lora/full time']:.3f}x wall, {rows[0]['lora/full CPU']:.3f}x CPU time")
    common.append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
