"""Memory of one training step at full SD-1.5 / SDXL size: what each way of training costs, and what fits where.

Rows (U-Net only: the text encoder and VAE are frozen and their outputs cached, the latent-cache default):
full fp32 + AdamW, + EMA, 8-bit AdamW, Adafactor, + gradient checkpointing, LoRA, LoRA on an int8 / NF4 / fp8
base (model.quantize_base). Each row runs in a fresh subprocess: random weights of the preset's size (built on the
meta device, then materialised layer by layer, so a quantized base is never whole in fp32), two training steps
(the first allocates the optimizer state; the second runs forward and backward with it present).

Three measures, all "over the process baseline" (RSS after imports, before any weight exists):
- rss: peak resident set size (``VmHWM``, reset after building) minus the baseline: what the OS saw.
- tracked: ``torch.distributed._tools.mem_tracker.MemTracker`` over the same steps: the peak of live tensor bytes,
  split into weights / grads / optimizer state / activations (and EMA, which it counts as weights of another
  module); allocator slack and Python objects are not in it.
- estimated: the same code under ``FakeTensorMode`` (no memory allocated) with the same tracker; for the rows too big
  for this machine (SDXL full fine-tuning needs ~41 GB). Validated on the SD-1.5 rows measured both ways: the
  script prints estimated / rss and estimated / tracked per row, and labels each estimated row with the worst
  difference. bitsandbytes runs no fake tensors: 8-bit AdamW's state is added to an estimate as its exact size
  (2 x (1 byte + 4 bytes per 256-value block) a parameter, fp32 below 4,096 values, as ``min_8bit_size``), checked
  against the measured SD-1.5 state.

Activations: the bytes saved for backward (tracked after the forward minus before) at several resolutions, fitted as
a * (latent pixels) + c (the CPU and GPU attention kernels, flash / memory-efficient, keep no L x L matrix: every
saved tensor is linear in the pixels), extrapolated to 512 and 1024 px, and checked against the fake-mode measure at
those sizes. "Fits in": weights + EMA + grads + optimizer state + activations at the preset's native resolution,
batch 1, fp32: the measured peak plus the activations the native resolution adds (an upper bound: the peak is at the
optimizer step, where the activations are gone), against 95% of 12 / 16 / 24 / 80 GiB.

    python bench/memory.py                       # sd15 + sdxl at 64 px, batch 1 (CPU: ~20 min, up to ~18 GB)
    python bench/memory.py --presets tiny --rows full_adamw,lora --resolution 32 --fit-resolutions 16,32,48
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # python bench/NAME.py: import from the repo root, not from bench/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from bench import common  # noqa: E402

ROWS = ("full_adamw", "full_adamw_ema", "full_adamw8bit", "full_adafactor", "full_adamw_gc", "lora", "lora_int8",
        "lora_nf4", "lora_fp8")
DEFAULT_ROWS = ROWS[:-1]  # fp8 on request (--rows): a CPU run per row costs minutes
LABELS = {"full_adamw": "full fp32 + AdamW", "full_adamw_ema": "full + AdamW + EMA",
          "full_adamw8bit": "full + 8-bit AdamW", "full_adafactor": "full + Adafactor",
          "full_adamw_gc": "full + AdamW + grad ckpt", "lora": "LoRA (fp32 base)", "lora_int8": "LoRA, int8 base",
          "lora_nf4": "LoRA, NF4 base", "lora_fp8": "LoRA, fp8 base"}
NATIVE = {"sd15": 512, "sd21": 768, "sdxl": 1024}
BUDGETS_GB = (12, 16, 24, 80)
GIB = 2 ** 30
MARK = "MEMROW "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="sd15,sdxl", help="U-Net presets (configs/model/sd15.yaml, sdxl.yaml)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma list of " + ", ".join(ROWS))
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels of the measured step")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fit-resolutions", default="64,128", help="resolutions of the activation fit")
    p.add_argument("--check-resolutions", default="", help="resolutions where the fit is checked (fake mode)")
    p.add_argument("--native", default=None, help="resolution of the 'fits in' column (default: the preset's)")
    p.add_argument("--max-real-gb", type=float, default=18.0,
                   help="rows whose estimate exceeds this are estimated only (not run for real)")
    p.add_argument("--estimate-only", action="store_true", help="no real runs")
    p.add_argument("--count", default=None, metavar="A,C,A_GC,C_GC",
                   help="no runs at all: every row counted from the parameter shapes on the meta device (the "
                        "estimator's sums, see count_rows) with this activation fit, bytes per latent pixel and "
                        "constant, without and with gradient checkpointing (from an earlier fake-mode sweep)")
    p.add_argument("--lora-preset", default="attention_ff")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda: peaks from torch.cuda.max_memory_allocated, "
                                                   "no tracker, no estimates (set --fit-resolutions '' and measure "
                                                   "at the native resolution)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    p.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    p.add_argument("--label", default="memory")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # ROW: run one row and print it
    p.add_argument("--fake", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-step", action="store_true", help=argparse.SUPPRESS)  # forward + backward only
    p.add_argument("--act-sweep", default=None, help=argparse.SUPPRESS)  # RES,...: saved activations at each
    p.add_argument("--estimate-rows", default="full_adamw,full_adamw_gc,lora",
                   help="rows also estimated where they are measured (the estimator's validation)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- one row

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_unet(preset: str, quantize: str | None, checkpointing: bool, fake: bool, device: str = "cpu"):
    """The preset's U-Net with random weights, materialised one leaf module at a time (and quantized right away)."""
    from ldm.models.unet import UNet

    if fake:  # under FakeTensorMode every tensor is fake already
        unet = UNet.from_preset(preset, gradient_checkpointing=checkpointing)
        return unet
    with torch.device("meta"):
        unet = UNet.from_preset(preset, gradient_checkpointing=checkpointing)
    if quantize:
        from ldm.models.quantized_base import quantized_class
        cls = quantized_class(quantize)
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if any(True for _ in child.children()) or not any(True for _ in child.parameters(recurse=False)):
                continue
            child.to_empty(device=device, recurse=False)
            common.randomize_(child)
            if quantize and type(child) is torch.nn.Linear:
                setattr(parent, name, cls.from_linear(child))
    return unet


def adamw8bit_state_bytes(params) -> int:
    """bitsandbytes AdamW8bit's state: two uint8 moments + one fp32 absmax per 256 values each, fp32 moments for
    tensors under min_8bit_size = 4096, and the two dynamic-quantization code books (shared)."""
    total, quantized = 0, False
    for p in params:
        n = p.numel()
        quantized |= n >= 4096
        total += 2 * (n + 4 * -(-n // 256)) if n >= 4096 else 2 * 4 * n
    return total + (2 * 256 * 4 if quantized else 0)  # + the two shared 256-entry fp32 code books


def adafactor_state_bytes(params) -> int:
    """torch.optim.Adafactor's state: fp32 row and column second-moment factors over the last two dims of a
    tensor with >= 2 dims (shape[:-1] and shape[:-2] + shape[-1:]), the full second moment of a vector, a step."""
    total = 0
    for p in params:
        shape = tuple(p.shape)
        if len(shape) >= 2:
            rows = torch.Size(shape[:-1]).numel()
            cols = torch.Size(shape[:-2] + shape[-1:]).numel()
            total += 4 * (rows + cols)
        else:
            total += 4 * p.numel()
        total += 4  # the step count
    return total


STATE_FORMULAS = {"adamw8bit": adamw8bit_state_bytes, "adafactor": adafactor_state_bytes}


def make_optimizer(row: str, params, fake: bool):
    if row.endswith("adamw8bit"):
        if fake:
            return None  # added as its exact size (bitsandbytes runs no fake tensors)
        from ldm.training.build.optimizers import adamw8bit
        return adamw8bit(params, lr=1e-5)
    if row.endswith("adafactor"):
        if fake:
            return None  # its step reads a value back (data-dependent under fake tensors): added as its size
        return torch.optim.Adafactor(params, lr=1e-2)
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=True)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class CudaAllocated:
    """On CUDA: the caching allocator's own counts stand in for the tracker (current = memory_allocated, peak =
    max_memory_allocated since the row began); no per-category split."""

    def track_external(self, *_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()

    def reset_mod_stats(self):
        pass

    def get_tracker_snapshot(self, kind: str):
        n = torch.cuda.max_memory_allocated() if kind == "peak" else torch.cuda.memory_allocated()
        return {torch.device("cuda"): {"Total": n}}


def memory_tracker():
    """torch's MemTracker, which puts a gradient hook on every parameter of a module it sees run: a frozen module
    (the base under LoRA) gets none (torch 2.13 raises on a parameter that needs no gradient)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAwareMemTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            trains = any(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and trains)

    return FrozenAwareMemTracker()


def run_row(args) -> dict:

    row, fake = args.child, args.fake
    torch.set_num_threads(args.threads)
    import ldm.models.lora  # noqa: F401 - the libraries' own memory is part of the baseline, not of the step
    import ldm.models.unet  # noqa: F401
    import ldm.training.module.ema  # noqa: F401
    if "8bit" in row or row.startswith("lora_"):
        import bitsandbytes  # noqa: F401
    gc.collect()
    common._malloc_trim()
    base_rss = common._rss()
    mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode()
    with mode:
        quantize = row.split("_", 1)[1] if row.startswith("lora_") else None
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        unet = build_unet(args.preset, quantize, row.endswith("_gc"), fake, args.device)
        unet.train()
        trained, ema, network = unet, None, None
        if row.startswith("lora"):
            from ldm.models.lora import LoRAConfig, LoRANetwork
            unet.requires_grad_(False)
            network = LoRANetwork.build({"unet": unet}, LoRAConfig(preset=args.lora_preset, rank=args.rank))
            network.attach({"unet": unet})
            trained = network
        params = [p for p in trained.parameters() if p.requires_grad]
        opt = make_optimizer(row, params, fake)
        if row.endswith("_ema"):
            from ldm.training.module.ema import EMA
            if fake:  # a deepcopy of fake tensors makes another fake mode: the averaged copy is built alike
                ema = EMA(torch.nn.Linear(1, 1), 0.999)
                ema.model = build_unet(args.preset, None, False, fake).requires_grad_(False).eval()
            else:
                ema = EMA(unet, 0.999)
        cfg = unet.config
        h = args.resolution // 8
        dev = torch.device(args.device) if not fake else None
        x = torch.randn(args.batch, cfg["in_channels"], h, h, device=dev)
        t = torch.randint(0, 1000, (args.batch,), device=dev)
        ctx = torch.randn(args.batch, 77, cfg["context_dim"], device=dev)
        y = torch.randn(args.batch, cfg["adm_in_channels"], device=dev) if cfg.get("adm_in_channels") else None
        target = torch.randn(args.batch, cfg["out_channels"], h, h, device=dev)
        gc.collect()
        common._malloc_trim()
        built_rss = common._rss() - base_rss
        _reset_peak_rss()
        tracker = CudaAllocated() if cuda else memory_tracker()
        tracker.track_external(*[m for m in (unet, network, ema) if m is not None], *([opt] if opt else []))
        saved, times = [], []
        with tracker:
            for _ in range(2):
                t0 = time.perf_counter()
                before = tracker.get_tracker_snapshot("current")
                with common.autocast(torch.device(args.device), args.precision):
                    out = unet(x, t, ctx, y)
                after = tracker.get_tracker_snapshot("current")
                saved.append(_total(after) - _total(before))
                F.mse_loss(out.float(), target).backward()
                del out
                grads = tensor_bytes(p.grad for p in params)
                if opt is not None and not args.no_step:
                    opt.step()
                if ema is not None:
                    ema.update(unet)
                if not args.no_step:
                    for p in params:
                        p.grad = None
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                tracker.reset_mod_stats()  # per-module stats of one iteration (the global peak is kept)
        peak = tracker.get_tracker_snapshot("peak")
    rss_peak = _status_bytes("VmHWM") - base_rss if not cuda else torch.cuda.max_memory_allocated() - base_cuda
    state = tensor_bytes(v for s in opt.state.values() for v in s.values()) if opt is not None else 0
    formula = STATE_FORMULAS.get(row.rsplit("_", 1)[-1])
    formula_state = formula(params) if formula else None
    if formula and fake:
        state = formula_state
    split = _split(peak)
    weights = tensor_bytes(list(unet.parameters()) + list(unet.buffers()))
    if row.startswith("lora_"):
        from ldm.models.quantized_base import stored_bytes
        weights = stored_bytes(unet)
    result = {
        "row": row, "preset": args.preset, "res": args.resolution, "batch": args.batch, "fake": fake,
        "params": sum(p.numel() for p in unet.parameters()) + (sum(p.numel() for p in network.parameters())
                                                               if network is not None else 0),
        "trainable": sum(p.numel() for p in params),
        "weights": weights + (tensor_bytes(network.parameters()) if network is not None else 0),
        "ema": tensor_bytes(ema.parameters()) if ema is not None else 0,
        "grads": grads, "opt_state": state, "act_saved": saved[-1],
        "tracked_peak": _total(peak) + (state if (formula and fake) else 0),
        "state_formula": formula_state,
        "state_formula_adamw8bit": adamw8bit_state_bytes(params),
        "state_formula_adafactor": adafactor_state_bytes(params),
        "tracked_split": split, "rss_peak": None if fake else rss_peak, "built_rss": None if fake else built_rss,
        "s/step": None if fake else min(times),
    }
    return result


def activation_sweep(args) -> dict:
    """Fake mode: bytes saved for backward by one forward at each resolution, without and with gradient
    checkpointing (one model, one tracker)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    out = {"plain": {}, "gc": {}}
    with FakeTensorMode():
        unet = build_unet(args.preset, None, False, fake=True).train()
        cfg = unet.config
        tracker = memory_tracker()
        tracker.track_external(unet)
        with tracker:
            for kind in ("plain", "gc"):
                unet.gradient_checkpointing = kind == "gc"
                for res in [int(r) for r in args.act_sweep.split(",")]:
                    h = res // 8
                    x = torch.randn(args.batch, cfg["in_channels"], h, h)
                    ctx = torch.randn(args.batch, 77, cfg["context_dim"])
                    y = torch.randn(args.batch, cfg["adm_in_channels"]) if cfg.get("adm_in_channels") else None
                    before = _total(tracker.get_tracker_snapshot("current"))
                    o = unet(x, torch.randint(0, 1000, (args.batch,)), ctx, y)
                    out[kind][res] = _total(tracker.get_tracker_snapshot("current")) - before
                    o.float().mean().backward()
                    del o
                    for p in unet.parameters():
                        p.grad = None
                    tracker.reset_mod_stats()
    return out


def _total(snapshot) -> int:
    return sum(v.get("Total", 0) for v in snapshot.values())


def _split(snapshot) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_device in snapshot.values():
        for k, v in per_device.items():
            name = str(k).rsplit(".", 1)[-1].lower()
            out[name] = out.get(name, 0) + int(v)
    return out


# ----------------------------------------------------------------------------------------------- the driver

def child(row: str, preset: str, res: int, args, fake: bool, no_step: bool = False, sweep: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", row, "--presets", preset,
           "--resolution", str(res), "--batch", str(args.batch), "--lora-preset", args.lora_preset,
           "--rank", str(args.rank), "--threads", str(args.threads), "--device", args.device,
           "--precision", args.precision] + (["--fake"] if fake else []) + \
        (["--no-step"] if no_step else []) + (["--act-sweep", sweep] if sweep else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(common.ROOT) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory row {row} ({preset}, {res}px, fake={fake}) failed (rc {proc.returncode}):\n"
                           + proc.stderr[-3000:])
    return json.loads(lines[-1][len(MARK):])


DERIVED = ("full_adamw_ema", "full_adamw8bit", "full_adafactor")


def derived(row: str, estimates: dict[str, dict]) -> dict:
    """An estimate made from the full AdamW one (one fake run less a row): an EMA copy of the weights added to its
    peak, or the optimizer state replaced by the other optimizer's exact size."""
    full = dict(estimates["full_adamw"])
    full["row"] = row
    params = full["params"]
    if row == "full_adamw_ema":
        full["ema"] = full["weights"]
        full["tracked_peak"] += full["weights"]
    else:  # a per-tensor step (bitsandbytes' fused kernel, Adafactor's loop) has no weights-sized temporaries as
        # AdamW's foreach step does: the peak is weights + grads + state (+ the activations, an upper bound)
        state = full["state_formula_" + row.rsplit("_", 1)[-1]]
        full["opt_state"] = state
        full["tracked_peak"] = full["weights"] + full["grads"] + state + full["act_saved"]
    full["derived_from"] = f"full_adamw ({params / 1e6:.0f}M parameters)"
    return full


def quantized_linear_bytes(precision: str, in_features: int, out_features: int, bias: bool) -> int:
    """Bytes one ``nn.Linear`` is stored in on a quantized base (ldm.models.quantized_base), counted without
    building it (tests/bench/test_memory_bench.py checks these against ``stored_bytes`` of built layers):
    int8 (bitsandbytes' Int8Params): 1 B a weight + an fp32 absmax per output row (SCB) + a 1-byte format flag;
    fp8: 1 B a weight + an fp32 scale per output row; nf4 (Params4bit, double-quantized): 4 bits a weight, a
    uint8 absmax per block of 64, an fp32 absmax per 256 blocks, the 16-entry NF4 and 256-entry nested code books
    (fp32) and the quant state's ~170-byte JSON record. The bias stays fp32."""
    n = in_features * out_features
    extra = 4 * out_features if bias else 0
    if precision == "int8":
        return n + 4 * out_features + 1 + extra
    if precision == "fp8":
        return n + 4 * out_features + extra
    if precision == "nf4":
        blocks = -(-n // 64)
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256) + NF4_STATE_JSON + extra
    raise ValueError(f"quantized_linear_bytes: unknown precision {precision!r} (int8, nf4, fp8)")


NF4_STATE_JSON = 170  # bytes of bitsandbytes' serialized 4-bit quant state (167-173 for these shapes)


def counted_quantized(row: str, lora: dict, preset: str) -> dict:
    """LoRA on a quantized base where it is not run (too big here): the LoRA-on-fp32-base estimate with each plain
    Linear of the base at its stored size instead of fp32 (`quantized_linear_bytes`, counted on the meta device).
    On SD-1.5 this count is within 0.08 GiB (3%) of the measured int8 / NF4 rows (bench/README.md): the measured
    peak holds one dequantized layer's weight besides."""
    from ldm.models.unet import UNet

    precision = row.split("_", 1)[1]
    with torch.device("meta"):
        unet = UNet.from_preset(preset)
    linears = [m for m in unet.modules() if type(m) is torch.nn.Linear]
    fp32 = sum(4 * (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)) for m in linears)
    stored = sum(quantized_linear_bytes(precision, m.in_features, m.out_features, m.bias is not None)
                 for m in linears)
    out = dict(lora, row=row, derived_from=f"lora ({len(linears)} Linear layers counted in {precision})")
    out["weights"] = lora["weights"] - fp32 + stored
    out["tracked_peak"] = lora["tracked_peak"] - fp32 + stored
    return out


def analytic_peak(row: str, preset: str, args) -> float:
    """A first guess of a row's fixed memory (weights, EMA, grads, optimizer state; bytes) from the parameter count
    alone, to decide whether it can run here: fp32 weights 4 B, grads 4 B, AdamW 8 B, EMA 4 B a parameter."""
    from ldm.models.unet import UNet

    with torch.device("meta"):
        unet = UNet.from_preset(preset)
    n = sum(p.numel() for p in unet.parameters())
    if row.startswith("lora"):
        linear = sum(m.weight.numel() for m in unet.modules() if type(m) is torch.nn.Linear)
        per = {"lora": 4.0, "lora_int8": 1.0, "lora_fp8": 1.0, "lora_nf4": 0.53}[row]
        return 4.0 * (n - linear) + per * linear + 0.5 * GIB
    per = {"full_adamw": 16, "full_adamw_ema": 20, "full_adamw8bit": 10.1, "full_adafactor": 8.1,
           "full_adamw_gc": 16}[row]
    return per * n + 1.0 * GIB  # + activations and temporaries at a small resolution


def count_rows(preset: str, rows: list[str], fit: tuple[float, float, float, float], res: int, native: int,
               lora_preset: str = "attention_ff", rank: int = 16) -> list[dict]:
    """Every row counted from the parameter shapes alone (meta device, nothing allocated), with the sums the
    estimator's rows are made of, validated on SD-1.5 against its measured rows (bench/README.md): full AdamW
    (foreach) peaks at its step at 5 x the weights (weights, grads, two moments, one weights-size of temporaries;
    the activations are freed by then), + EMA one more; 8-bit AdamW / Adafactor: weights + grads + their exact state
    + the activations (`derived`); LoRA: the base + the adapter's weights, grads and two moments + the activations;
    on a quantized base with the Linear layers at their stored size (`counted_quantized`). Activations at ``res``
    and ``native`` from ``fit`` = (a, c, a_gc, c_gc): a * (res/8)^2 + c bytes per image."""
    from ldm.models.lora import LoRAConfig, LoRANetwork
    from ldm.models.unet import UNet

    with torch.device("meta"):
        unet = UNet.from_preset(preset, gradient_checkpointing=False)
        params = list(unet.parameters())
        w = tensor_bytes(params) + tensor_bytes(unet.buffers())
        unet.requires_grad_(False)
        adapter = [p for p in LoRANetwork.build({"unet": unet}, LoRAConfig(preset=lora_preset, rank=rank)).parameters()]
    n, lora_bytes = sum(p.numel() for p in params), tensor_bytes(adapter)
    a, c, a_gc, c_gc = fit

    def act(r, gc=False):
        return (a_gc if gc else a) * (r / 8) ** 2 + (c_gc if gc else c)

    out = []
    for row in rows:
        gc = row.endswith("_gc")
        r = {"row": row, "preset": preset, "res": res, "batch": 1, "fake": True, "how": "counted", "ema": 0,
             "params": n, "trainable": n, "weights": w, "grads": w, "opt_state": 2 * w, "act_saved": act(res, gc),
             "rss_peak": None, "estimated_peak": None, "native": native}
        if row in ("full_adamw", "full_adamw_gc", "full_adamw_ema"):
            r["tracked_peak"] = 5 * w
            if row == "full_adamw_ema":
                r["ema"], r["tracked_peak"] = w, 6 * w
        elif row in ("full_adamw8bit", "full_adafactor"):
            r["opt_state"] = (adamw8bit_state_bytes if row.endswith("8bit") else adafactor_state_bytes)(params)
            r["tracked_peak"] = 2 * w + r["opt_state"] + act(res)
        else:
            lora = dict(r, trainable=lora_bytes // 4, weights=w + lora_bytes, grads=lora_bytes,
                        opt_state=2 * lora_bytes, tracked_peak=w + 4 * lora_bytes + act(res))
            r = lora if row == "lora" else counted_quantized(row, lora, preset)
        r["peak_native"] = r["tracked_peak"] - act(res, gc) + act(native, gc)
        r["act_native"] = act(native, gc)
        r["fits"] = [g for g in BUDGETS_GB if r["peak_native"] <= g * GIB * 0.95]
        out.append(r)
    return out


def fit_activations(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least squares of act = a * (res/8)^2 + c over (res, bytes) points."""
    xs = [(r / 8) ** 2 for r, _ in points]
    ys = [b for _, b in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return a, my - a * mx


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def print_rows(results: list[dict], args, presets: list[str]) -> None:
    table = [{"preset": r["preset"], "row": LABELS[r["row"]], "how": r["how_text"],
              "trainable": f"{r['trainable'] / 1e6:.1f}M", "weights": gib(r["weights"] + r["ema"]),
              "grads": gib(r["grads"]), "opt state": gib(r["opt_state"]), "act": gib(r["act_saved"]),
              "peak rss": gib(r.get("rss_peak")), "peak tracked": gib(r["tracked_peak"]),
              "peak @native": gib(r["peak_native"]),
              "fits in": "-" if r["peak_native"] is None else (", ".join(f"{g}" for g in r["fits"]) or "> 80")}
             for r in results]
    print()
    common.print_table(table, list(table[0]) if table else [],
                       title=f"GiB; batch {args.batch}, {args.resolution} px, {args.precision} on {args.device}; @native: "
                             f"{', '.join(f'{p} {NATIVE.get(p)} px' for p in presets)}, batch 1, upper bound")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        args.preset = args.presets
        print(MARK + json.dumps(activation_sweep(args) if args.child == "act" else run_row(args)), flush=True)
        return []
    presets = [p for p in args.presets.split(",") if p]
    rows_wanted = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows_wanted if r not in ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown {bad}; choose from {', '.join(ROWS)}")
    if args.count:
        fit = tuple(float(v) for v in args.count.split(","))
        if len(fit) != 4:
            raise SystemExit("--count: four numbers A,C,A_GC,C_GC (bytes per latent pixel and constant, without "
                             "and with gradient checkpointing)")
        results = [r for preset in presets for r in count_rows(
            preset, rows_wanted, fit, args.resolution, int(args.native or NATIVE.get(preset, 4 * args.resolution)),
            args.lora_preset, args.rank)]
        for r in results:
            r["how_text"] = "counted"
        common.append_jsonl(args.json, results)
        print_rows(results, args, presets)
        return results
    fit_res = [int(r) for r in args.fit_resolutions.split(",") if r]
    print(common.env_line(torch.device(args.device)))
    print(f"memory of one training step: batch {args.batch}, {args.resolution} px, {args.precision}, {args.device}, "
          f"{args.threads} "
          f"thread(s); LoRA {args.lora_preset} rank {args.rank}; U-Net only (text encoder / VAE outputs cached)")
    results, validation = [], []
    for preset in presets:
        native = int(args.native or NATIVE.get(preset, 4 * args.resolution))
        a = c = a_gc = c_gc = None
        estimates: dict[str, dict] = {}
        if fit_res:
            # activations: saved-for-backward bytes at several resolutions (fake mode: no memory), fitted
            checks = [int(r) for r in args.check_resolutions.split(",") if r]
            sweep = child("act", preset, args.resolution, args, fake=True,
                          sweep=",".join(str(r) for r in fit_res + checks))
            fit_points = [(r, sweep["plain"][str(r)]) for r in fit_res]
            a, c = fit_activations(fit_points)
            check = {r: sweep["plain"][str(r)] for r in checks}
            a_gc, c_gc = fit_activations([(r, sweep["gc"][str(r)]) for r in fit_res])
            print(f"\n[{preset}] activations saved for backward (batch {args.batch}, fp32), fake-mode measured at "
                  + ", ".join(f"{r} px: {b / 2**20:.1f} MiB" for r, b in fit_points))
            print(f"  fit: act(res) = {a / 2**10:.2f} KiB x (res/8)^2 + {c / 2**20:.1f} MiB per image "
                  f"(latent pixels; flash / memory-efficient attention: no L x L matrix kept)")
            for r, measured in check.items():
                pred = a * (r / 8) ** 2 + c
                print(f"  extrapolated to {r} px: {pred / GIB:.2f} GiB per image; fake-mode measured there: "
                      f"{measured / GIB:.2f} GiB ({pred / measured - 1:+.1%})")
            print(f"  gradient checkpointing: act(res) = {a_gc / 2**10:.2f} KiB x (res/8)^2 + {c_gc / 2**20:.1f} MiB "
                  f"({a_gc / a:.1%} of the slope without)")
        for row in rows_wanted:
            cuda = args.device.startswith("cuda")
            guess = analytic_peak(row, preset, args)
            fits_here = cuda or (not args.estimate_only and guess <= args.max_real_gb * GIB)
            wanted = not fits_here or row in args.estimate_rows.split(",")
            est = None
            if wanted and not cuda and not row.startswith("lora_"):
                est = derived(row, estimates) if row in DERIVED and "full_adamw" in estimates else \
                    child(row, preset, args.resolution, args, fake=True)
                estimates[row] = est
            elif not fits_here and not cuda and row.startswith("lora_"):  # bitsandbytes runs no fake tensors
                if "lora" not in estimates:
                    print(f"  {row}: not run here and no LoRA estimate to count it from (add lora before it to --rows)")
                    continue
                est = counted_quantized(row, estimates["lora"], preset)
            real = None
            if fits_here:
                try:
                    real = child(row, preset, args.resolution, args, fake=False)
                except RuntimeError as e:  # killed for memory, say: the row is reported as estimated
                    print(f"  {row}: the real run failed, estimate only: {str(e)[-300:]}")
                    if est is None:
                        continue
            r = dict(real or est)
            r["label"] = args.label
            r["bench"] = "memory"
            r["how"] = "measured" if real else ("counted" if row.startswith("lora_") else "estimated")
            r["estimated_peak"] = est["tracked_peak"] if est else None
            if a is not None:  # the measured activations scaled by the fit to the native resolution
                slope, const = (a_gc, c_gc) if row.endswith("_gc") else (a, c)
                act_native = r["act_saved"] / max(1e-9, slope * (args.resolution / 8) ** 2 + const) * (
                    slope * (native / 8) ** 2 + const)
                r["peak_native"] = r["tracked_peak"] + act_native - r["act_saved"]  # the step's peak, more activations
            else:  # measured there (--resolution = the native one, e.g. on a GPU)
                act_native = r["act_saved"] if args.resolution == native else None
                r["peak_native"] = r["tracked_peak"] if args.resolution == native else None
            r["native"] = native
            r["act_native"] = act_native
            r["fits"] = [g for g in BUDGETS_GB if r["peak_native"] is not None and r["peak_native"] <= g * GIB * 0.95]  # 5%: CUDA context, slack
            if real and est:
                validation.append((preset, row, est["tracked_peak"], real["rss_peak"], real["tracked_peak"]))
            results.append(r)
            common.append_jsonl(args.json, [r])  # row by row: a long run keeps what it measured
            print(f"  {row}: {r['how']} rss {gib(r.get('rss_peak'))} GiB, tracked {gib(r['tracked_peak'])} GiB, "
                  f"estimated {gib(r['estimated_peak'])} GiB", flush=True)
    worst = None
    if validation:
        print("\nestimator validation (FakeTensorMode + MemTracker vs the real run):")
        for preset, row, est, rss, tracked in validation:
            print(f"  {preset} {row}: estimated {gib(est)} GiB, rss {gib(rss)} GiB ({est / rss - 1:+.1%}), "
                  f"tracked {gib(tracked)} GiB ({est / tracked - 1:+.1%})")
        worst = max(abs(est / rss - 1) for _, _, est, rss, _ in validation)
    for r in results:
        r["how_text"] = r["how"] if r["how"] != "estimated" or worst is None else \
            f"estimated (validated to {worst:.0%})"
    print_rows(results, args, presets)
    return results


if __name__ == "__main__":
    main()
