"""Shared helpers of the benchmarks: devices, timing with warm-up, peak memory, FLOPs, tables, and the
ldm <-> diffusers model pairs they compare.

Nothing here imports diffusers, datasets or webdataset at module level: the GPU machine installs diffusers from
carried wheels and has neither datasets nor webdataset (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` from anywhere, without installing ldm
    sys.path.insert(0, str(ROOT))

LDM_PREFIX = "model.diffusion_model."
H100_BF16_DENSE_TFLOPS = 783.0  # measured 8192^3 bf16 matmul on this workplace's H100 (spec sheet: 989)

# -----------------------------------------------------------------------------
# devices, precision


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """fp32: no autocast; bf16 / fp16: torch.autocast on the device (weights and optimizer stay fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--preset", default=None, help="U-Net preset (tiny | small | sd15 | ...); default tiny on "
                                                       "CPU, sd15 on CUDA")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (latent = /8)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per implementation (alternating)")
    parser.add_argument("--steps", type=int, default=None, help="timed calls per round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per implementation first")
    parser.add_argument("--compile", action="store_true", help="torch.compile both U-Nets")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format for both")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; CPU default 1: on a shared machine two threads that wait for "
                             "each other are slower and far noisier than one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impls", default="ldm,diffusers", help="comma list of ldm,diffusers")
    parser.add_argument("--label", default="", help="prefix for the table's rows (used by gpu.sh)")
    return parser


def fill_defaults(args, device: torch.device, cpu: dict, cuda: dict) -> None:
    """Replace None options by the CPU or CUDA default."""
    defaults = cuda if device.type == "cuda" else cpu
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "precision", None) is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if getattr(args, "threads", None) is None and device.type == "cpu":
        args.threads = 1
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


# -----------------------------------------------------------------------------
# timing


def alternate(cases: dict[str, Callable[[], object]], device: torch.device, rounds: int, steps: int,
              warmup: int) -> dict[str, dict]:
    """Time each case in alternating rounds within one process (machines here are shared and noisy).

    Every case first runs `warmup` untimed calls (the first one's time is reported: compile time); then, per
    round, each case runs `steps` calls between two device syncs; the order of the cases flips every round.
    Returns {name: {"median": s/call, "min": s/call, "rounds": [...], "first": s}}.
    """
    out = {name: {"rounds": [], "first": float("nan")} for name in cases}
    for name, fn in cases.items():
        for i in range(warmup):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i == 0:
                out[name]["first"] = time.perf_counter() - t0
    names = list(cases)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = cases[name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            out[name]["rounds"].append((time.perf_counter() - t0) / steps)
    for stats in out.values():
        stats["median"] = statistics.median(stats["rounds"])
        stats["min"] = min(stats["rounds"])
    return out


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """How many times one call of fn makes the host wait for the GPU (torch.cuda sync debug mode); None on CPU."""
    if device.type != "cuda":
        return None
    import warnings

    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# -----------------------------------------------------------------------------
# memory


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict filled on exit with "bytes": the peak memory the block added over what was allocated before
    it. CUDA: torch.cuda.max_memory_allocated; CPU: process RSS sampled every millisecond (approximate)."""
    result = {"bytes": float("nan"), "kind": "cuda peak" if device.type == "cuda" else "RSS peak delta"}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        sync(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - before
        return
    _malloc_trim()  # hand freed heap back to the OS, so that reuse of cached blocks does not hide the peak
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], _rss())
        result["bytes"] = peak[0] - before


def fmt_bytes(n: float) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / 2**20:.0f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"


# -----------------------------------------------------------------------------
# FLOPs


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention kernels (not in torch's registry)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn (matmuls, convolutions and attention; elementwise ops are not counted)."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def mfu(flops_per_item: float, items_per_s: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops or not flops_per_item:
        return None
    return flops_per_item * items_per_s / (peak_tflops * 1e12)


# -----------------------------------------------------------------------------
# tables


def print_table(rows: list[dict], columns: list[str], title: str | None = None, file=None) -> str:
    """Left-aligned plain-text table (also valid Markdown)."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(f"\n## {title}")
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text


def append_jsonl(path: str | None, rows: list[dict]) -> None:
    """Append the rows to a JSON-lines file (gpu.sh collects every benchmark's rows into one); no path: nothing."""
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) >= 0.01 else f"{v:.2e}"
    return str(v)


def env_line(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    return f"torch {torch.__version__} | {name}"


# -----------------------------------------------------------------------------
# models: our UNet and the same weights in diffusers' UNet2DConditionModel


def diffusers_unet_config(cfg: dict, sample_size: int = 64) -> dict:
    """diffusers UNet2DConditionModel config equivalent to our UNet config (as tests/models/test_unet.py)."""
    levels = range(len(cfg["channel_mult"]))
    block_out = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    if cfg["num_head_channels"] > 0:
        heads = [c // cfg["num_head_channels"] for c in block_out]
    else:
        heads = cfg["num_heads"]
    att = set(cfg["attention_levels"])
    return dict(
        sample_size=sample_size,
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if i in att else "DownBlock2D" for i in levels],
        up_block_types=["CrossAttnUpBlock2D" if i in att else "UpBlock2D" for i in reversed(levels)],
        block_out_channels=block_out,
        layers_per_block=cfg["num_res_blocks"],
        cross_attention_dim=cfg["context_dim"],
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads
        use_linear_projection=cfg["use_linear_projection"],
        transformer_layers_per_block=cfg["transformer_depth"],
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter seeded random (zero-init layers included), ~unit-variance activations.
    Drawn on the parameters' device (fast for sd15 on a GPU)."""
    generators = {}
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if p.device not in generators:
                generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            r = torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)
            if isinstance(mod, norms) and name == "weight":
                p.copy_(1.0 + 0.2 * r)
            elif p.ndim >= 2:
                p.copy_(r / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * r)
    return model


def unet_pair(preset: str, device: torch.device, seed: int = 0, want_diffusers: bool = True, **overrides):
    """(ours, diffusers' or None) U-Nets with identical random weights, fp32 on `device`.

    The weights go through diffusers' own SD -> diffusers converter (`convert_ldm_unet_checkpoint`)."""
    from ldm.models.unet import UNet

    with torch.device(device):  # built where they run: no host-side init of 860M parameters
        ours = randomize_(UNet.from_preset(preset, **overrides), seed)
    ref = None
    if want_diffusers:
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        dcfg = diffusers_unet_config(ours.config)
        with torch.device(device):
            ref = UNet2DConditionModel(**dcfg)
        ckpt = {LDM_PREFIX + k: v for k, v in ours.state_dict().items()}
        ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dcfg), strict=True)
    return ours, ref


class DiffusersAdapter(torch.nn.Module):
    """diffusers' U-Net behind our signature model(x, t, context) -> tensor."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def parse_impls(text: str) -> list[str]:
    impls = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in impls if s not in ("ldm", "diffusers")]
    if bad or not impls:
        raise SystemExit(f"--impls: expected a comma list of ldm,diffusers; got {text!r}")
    return impls


def ratio_line(what: str, ours: float, ref: float, higher_is_better: bool = True) -> str:
    r = ours / ref if higher_is_better else ref / ours
    return f"ratio ldm/diffusers {what}: {r:.3f}x"


# -----------------------------------------------------------------------------
# one table from the JSON lines the benchmarks append (bench/gpu.sh)


def summary_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        bench = r.get("bench")
        row = {"run": r.get("label", ""), "bench": bench}
        if bench == "train_step":
            row.update(config=f"{r['preset']} {r['res']}px b{r['batch']} {r['precision']} {r['variant']}",
                       impl=r["impl"], throughput=f"{r['img/s']:.1f} img/s", ms=r["ms/step"], MFU=r.get("MFU"),
                       mem=r.get("peak mem"), ratio=r.get("ldm/diffusers"),
                       note=f"{r['GFLOP/img']:.4g} GFLOP/img, {r['TFLOP/s']:.3g} TFLOP/s, first step "
                            f"{r['first call s']:.3g}s" + (f", {r['host syncs']} host syncs/step"
                                                           if r.get("host syncs") is not None else ""))
        elif bench == "sample":
            ddim = next(k for k in r if k.startswith("ddim") and k.endswith(" s"))
            row.update(config=f"{r['preset']} {r['res']}px b{r['batch']}x2 {r['precision']} {r['variant']}",
                       impl=r["impl"], throughput=f"{r['unet calls/s']:.1f} U-Net calls/s", ms=r["ms/call"],
                       ratio=r.get("ldm/diffusers calls"),
                       note=f"{ddim[:-2]} {r[ddim]:.3g}s" + (f" (ldm/diffusers {r['ldm/diffusers ddim']:.3f}x)"
                                                            if "ldm/diffusers ddim" in r else "")
                            + f", first call {r['first call s']:.3g}s")
        elif bench == "latent_cache":
            row.update(config=r["setup"], impl=r["path"], throughput=f"{r['img/s']:.1f} img/s", ms=r["ms/step"],
                       ratio=r.get("ratio"), note="ratio = cached / on-the-fly" if r.get("ratio") else "")
        elif bench == "data":
            rates = ", ".join(f"{k[6:]}: {v:.0f}" for k, v in r.items() if k.startswith("img/s"))
            row.update(config=r["source"], impl="ldm.data", throughput=f"img/s {rates}")
        elif bench == "memory":
            row.update(config=f"{r['preset']} {r['res']}px b{r['batch']} {r['row']}", impl="ldm",
                       mem=fmt_bytes(r["tracked_peak"]),
                       note=f"{r['how']}: weights {fmt_bytes(r['weights'] + r['ema'])}, grads {fmt_bytes(r['grads'])}, "
                            f"optimizer {fmt_bytes(r['opt_state'])}, activations {fmt_bytes(r['act_saved'])}")
        else:
            row.update(config="-", impl="-", note=r.get("note", "skipped"))
        rows.append(row)
    return rows


def summarize(path: str) -> str:
    records = []
    with open(path) as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    return print_table(summary_rows(records), ["run", "bench", "config", "impl", "throughput", "ms", "MFU", "mem",
                                               "ratio", "note"], title=f"summary of {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="bench helpers: `summarize RESULTS.jsonl` prints one table")
    parser.add_argument("command", choices=["summarize"])
    parser.add_argument("path")
    cli = parser.parse_args()
    summarize(cli.path)
