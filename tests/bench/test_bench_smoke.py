"""The benchmark scripts run end to end with the smallest settings and print their ratios (no timing asserts)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.bench import bench_module, tiny_base

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
QUICK = ["--rounds", "1", "--steps", "1", "--warmup", "1", "--device", "cpu"]


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_train_step(capsys, tmp_path):
    pytest.importorskip("diffusers")
    rows = bench_module("train_step").main(
        QUICK + ["--preset", "tiny", "--resolution", "32", "--batch", "2", "--json", str(tmp_path / "r.jsonl")])
    out = capsys.readouterr().out
    assert "ratio ldm/diffusers img/s:" in out
    assert "max |ldm - diffusers| forward output before training: 0.00e+00" in out  # same weights, same math
    assert [r["impl"] for r in rows] == ["ldm", "diffusers"]
    assert all(positive(r["img/s"]) and positive(r["ldm/diffusers"]) for r in rows)
    assert rows[0]["GFLOP/img"] == pytest.approx(rows[1]["GFLOP/img"])  # FlopCounterMode sees the same model
    assert rows[0]["GFLOP/img"] > 0
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2


def test_train_step_variants_ldm_only(capsys):
    rows = bench_module("train_step").main(
        QUICK + ["--preset", "tiny", "--resolution", "32", "--batch", "2", "--impls", "ldm", "--channels-last",
                 "--gradient-checkpointing", "--peak-tflops", "1"])
    assert rows[0]["variant"] == "channels_last+grad_ckpt" and positive(rows[0]["MFU"])
    assert "ratio" not in capsys.readouterr().out  # nothing to compare with


def test_sample(capsys):
    pytest.importorskip("diffusers")
    rows = bench_module("sample").main(
        QUICK + ["--preset", "tiny", "--resolution", "32", "--ddim-steps", "3", "--ddim-rounds", "1"])
    out = capsys.readouterr().out
    assert "ratio ldm/diffusers U-Net calls/s:" in out and "ratio ldm/diffusers DDIM-3" in out
    diff = float(out.split("max |ldm - diffusers| / max |diffusers|: ")[1].split()[0])
    assert diff < 1e-4  # our DDIM loop and diffusers' reach the same latents
    assert all(positive(r["unet calls/s"]) for r in rows)


def test_latent_cache_bench(capsys):
    rows = bench_module("latent_cache").main(
        ["--device", "cpu", "--rounds", "1", "--steps", "1", "--warmup", "1", "--samples", "16", "--batch", "4"])
    assert "ratio cached/on-the-fly img/s:" in capsys.readouterr().out
    assert positive(rows[1]["ratio"])


def test_data(capsys):
    pytest.importorskip("datasets")
    pytest.importorskip("webdataset")
    rows = bench_module("data").main(["--images", "8", "--batch", "4", "--epochs", "1", "--source-size", "48x40",
                                      "--resolution", "32", "--workers", "0,2", "--shards", "2"])
    out = capsys.readouterr().out
    assert [r["source"] for r in rows] == ["shapes", "folder-png", "folder-jpg", "hf", "webdataset"]
    for row in rows:
        assert positive(row["img/s w=0"]) and positive(row["img/s w=2"])
        assert f"ratio {row['source']} workers 2/0:" in out


def test_summary_table(tmp_path, capsys):
    common = bench_module("common")
    path = tmp_path / "r.jsonl"
    rows = [
        {"bench": "train_step", "label": "a", "impl": "ldm", "preset": "tiny", "res": 32, "batch": 2,
         "precision": "fp32", "variant": "eager", "img/s": 10.0, "ms/step": 200.0, "GFLOP/img": 0.06,
         "TFLOP/s": 0.001, "first call s": 0.1, "MFU": None, "peak mem": "1 MiB", "ldm/diffusers": 1.1},
        {"bench": "skipped", "label": "b", "note": "skipped: needs 240s, 10s left"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common.summarize(str(path))
    out = capsys.readouterr().out
    assert "tiny 32px b2 fp32 eager" in out and "skipped: needs 240s" in out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_parses_and_everything_it_calls_exists():
    import re

    script = (BENCH / "gpu.sh").read_text()
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], capture_output=True).returncode == 0
    called = re.findall(r"^\s*run\s+\S+\s+\d+\s+(\S+\.py)", script, flags=re.M)
    assert {"memory.py", "train_step.py", "sample.py", "latent_cache.py"} <= set(called)
    for name in called:
        assert (BENCH / name).is_file(), name
    for path in set(re.findall(r"(?<![\w/])((?:tests|bench)/[\w/]+\.py)", script)):
        guarded = f"[ -f {path} ]" in script  # an optional script of another branch (a hook)
        assert (ROOT / path).is_file() or guarded, path
    assert "tests/training/test_host_syncs.py" in script and "tests/training/test_unet_compile.py" in script


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_script_on_cpu(tmp_path):
    """bench/gpu.sh's plumbing with CPU-sized models (the GPU run itself needs a GPU)."""
    env = dict(os.environ, BENCH_DEVICE="cpu", BENCH_PRESET="tiny", BENCH_RES_LO="32", BENCH_RES_HI="64",
               BENCH_BATCH_LO="4", BENCH_BATCH_HI="2", BENCH_VAE="small", BENCH_TEXT="tiny", BENCH_CACHE_RES="32",
               BENCH_CACHE_BATCH="4", BENCH_QUICK="1", BENCH_SKIP_COMPILE="1", PYTHON=sys.executable,
               BENCH_SKIP_TESTS="1", BENCH_SKIP_FIRST_EPOCH="1", BENCH_MEM_PRESETS="tiny:32",
               BENCH_MEM_ROWS="full_adamw,lora_nf4")
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    for label in ("train-lo-eager", "train-hi-eager", "train-hi-chlast", "sample-eager", "latent-cache",
                  "train-lo-chlast", "memory-tiny-32"):
        assert label in summary
    assert "failed" not in summary


@pytest.mark.slow
def test_own_folder(capsys, tmp_path):
    rows = bench_module("own_folder").main(["--images", "12", "--steps", "2", "--rounds", "1", "--dir",
                                            str(tmp_path), "--override", "data.batch_size=4"])
    assert "ratio on-the-fly/cached wall time, whole train():" in capsys.readouterr().out
    assert positive(rows[1]["ratio"]) and len(list((tmp_path / "cache" / "latents").iterdir())) == 1


def test_lora_step(capsys):
    rows = bench_module("lora_step").main(QUICK + ["--preset", "tiny", "--resolution", "32", "--batch", "2"])
    assert "step time lora/full:" in capsys.readouterr().out
    assert [r["impl"] for r in rows] == ["full", "lora"]
    assert 0 < rows[1]["trainable"] < rows[0]["trainable"] / 10  # only the adapters train
    assert all(positive(r["ms/step"]) and positive(r["lora/full time"]) for r in rows)


def test_lora_step_every_adapter_type(capsys):
    rows = bench_module("lora_step").main(QUICK + ["--preset", "tiny", "--resolution", "32", "--batch", "2",
                                                   "--impls", "full,loha,lokr,dora,lora_int8,lora_nf4"])
    assert [r["impl"] for r in rows] == ["full", "loha", "lokr", "dora", "lora_int8", "lora_nf4"]
    assert all(0 < r["trainable"] < rows[0]["trainable"] / 10 for r in rows[1:])  # only the adapters train
    assert all(positive(r["CPU/full"]) for r in rows) and "CPU/full" in capsys.readouterr().out
    stored = {r["impl"]: r["base bytes"] for r in rows}  # the quantized bases hold fewer bytes (tiny: few Linears)
    assert stored["lora_nf4"] < stored["lora_int8"] < stored["full"] == stored["loha"]


@pytest.mark.slow
def test_controlnet_shapes(capsys, tmp_path):
    """bench/controlnet_shapes.py end to end on a tiny base: IoU and prompt accuracy with and without, a grid."""
    from tests.helpers.training import TINY_MODEL

    base = tiny_base(tmp_path)
    tiny = [o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "callbacks=", "data.batch_size"))]
    result = bench_module("controlnet_shapes").main(
        ["--base", base, "--out", str(tmp_path / "cn"), "--steps", "2", "--n", "4", "--resolution", "16", "--",
         *tiny, "adapter.hint_channels=[16,32]", "data.train.size=16", "data.val.size=4", "data.batch_size=4",
         "callbacks=none"])
    out = capsys.readouterr().out
    assert "| with the ControlNet |" in out and "| without the ControlNet |" in out
    assert all(0 <= result[w]["iou"] <= 1 and result[w]["n"] == 4 for w in ("with", "without"))
    assert (tmp_path / "cn" / "grid.png").is_file() and (tmp_path / "cn" / "result.json").is_file()


@pytest.mark.slow
def test_shapes_lora(capsys, tmp_path):
    """bench/shapes_lora.py end to end on a tiny base: before/after per colour, cyan included."""
    from tests.helpers.training import TINY_MODEL

    base = tiny_base(tmp_path)
    tiny = [o for o in TINY_MODEL if not o.startswith(("trainer.", "callbacks=", "data.batch_size"))]
    row = bench_module("shapes_lora").main(
        ["--base", base, "--out", str(tmp_path / "lora"), "--per-prompt", "1", "--", *tiny, "trainer.max_steps=2",
         "data.train.size=16", "data.val.size=4", "data.batch_size=4", "callbacks=none",
         "trainer.val_check_interval=2", "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
         "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"])
    out = capsys.readouterr().out
    assert "cyan (new)" in out and "six old colours" in out
    for when in ("before", "after"):
        assert row[when]["cyan"]["n"] == 3 and row[when]["old"]["color_acc"] >= 0
        assert row[when]["all"]["n"] == 21


def test_optim_memory(capsys):
    pytest.importorskip("bitsandbytes")
    rows = bench_module("optim_memory").main(["--device", "cpu", "--preset", "tiny", "--resolution", "16",
                                              "--batch", "1", "--steps", "1"])
    assert [r["optimizer"] for r in rows] == ["adamw", "adamw8bit", "adafactor", "prodigy", "adamw_schedulefree",
                                             "lion", "came"]
    by = {r["optimizer"]: r for r in rows}
    assert by["adamw"]["state B/param"] == 8.0  # two fp32 moments per parameter
    assert by["adamw8bit"]["state / adamw"] < 0.5 and by["adafactor"]["state / adamw"] < 0.5
    # one fp32 moment (Lion); z + the second moment (schedule-free); + s and the initial weights (Prodigy)
    assert by["lion"]["state B/param"] == 4.0 and by["adamw_schedulefree"]["state B/param"] == 8.0
    assert by["prodigy"]["state B/param"] == 16.0 and by["came"]["state / adamw"] < 1.0
    assert "state / adamw" in capsys.readouterr().out


@pytest.mark.slow
def test_buckets(capsys, tmp_path):
    rows = bench_module("buckets").main(["--images", "14", "--steps", "2", "--rounds", "1", "--dir", str(tmp_path)])
    assert [r["path"] for r in rows] == ["square", "buckets"]
    assert rows[0]["px/img"] == 64 * 64 and rows[1]["px/img"] < 64 * 64 and rows[1]["px ratio"] > 0
    assert "ratio buckets/square" in capsys.readouterr().out


def test_cache_ranks(capsys):
    rows = bench_module("cache_ranks").main(["--images", "8", "--resolution", "16", "--vae", "tiny",
                                             "--part-size", "2", "--batch", "2"])
    out = capsys.readouterr().out
    assert "caches identical byte for byte across process counts: True" in out
    assert "ratio cache build time 1 / 2 process(es):" in out
    assert [r["ranks"] for r in rows] == [1, 2] and sum(rows[1]["encoded per process"]) == 8
    assert all(positive(r["wall s"]) for r in rows)


def test_memory_state_formulas_equal_the_optimizers():
    """The optimizer-state sizes the estimator adds for what fake tensors cannot run equal the real states."""
    bnb = pytest.importorskip("bitsandbytes")
    memory = bench_module("memory")
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 64, 3), torch.nn.Flatten(), torch.nn.Linear(64 * 6 * 6, 96))
    params = list(model.parameters())
    for opt, formula in ((bnb.optim.AdamW8bit(params, min_8bit_size=4096), memory.adamw8bit_state_bytes),
                         (torch.optim.Adafactor(params), memory.adafactor_state_bytes)):
        model(torch.randn(2, 8, 8, 8)).sum().backward()
        opt.step()
        state = memory.tensor_bytes(v for s in opt.state.values() for v in s.values())
        assert formula(params) == pytest.approx(state, abs=16 * len(params))  # step counters aside
    a, c = memory.fit_activations([(16, 4 * 10 + 7), (32, 16 * 10 + 7), (48, 36 * 10 + 7)])
    assert (a, c) == pytest.approx((10, 7))


@pytest.mark.slow  # six subprocesses (~90 s on the loaded 2-core machine)
def test_memory(capsys, tmp_path):
    """bench/memory.py on the tiny preset: rows in subprocesses, the estimator validated against a real run, the
    activation fit, and gradient checkpointing cutting the saved activations (measured, not claimed)."""
    pytest.importorskip("bitsandbytes")
    rows = bench_module("memory").main(["--presets", "tiny", "--rows", "full_adamw,lora_nf4", "--estimate-rows",
                                        "full_adamw", "--resolution", "32", "--fit-resolutions", "16,32,48",
                                        "--native", "64", "--json", str(tmp_path / "m.jsonl")])
    out = capsys.readouterr().out
    by = {r["row"]: r for r in rows}
    full, nf4 = by["full_adamw"], by["lora_nf4"]
    assert full["how"] == "measured" and full["rss_peak"] > 0 and full["estimated_peak"] > 0
    assert full["grads"] == full["weights"]
    assert full["opt_state"] == pytest.approx(2 * full["grads"], rel=1e-3)  # AdamW: two fp32 moments (+ steps)
    assert full["estimated_peak"] == pytest.approx(full["tracked_peak"], rel=0.05)  # fake mode = real tensors
    assert nf4["trainable"] < full["trainable"] / 5 and nf4["weights"] < full["weights"]  # tiny: mostly convs
    assert "estimator validation" in out and "fit: act(res) =" in out
    gc_line = out.split("gradient checkpointing: act(res) = ")[1]
    assert float(gc_line.split("MiB (")[1].split("%")[0]) < 50  # checkpointing keeps < half the activations
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("precision", ["int8", "nf4", "fp8"])
def test_memory_counts_a_quantized_linear_as_it_is_stored(precision):
    """The bytes bench/memory.py counts for a quantized base's Linear (SDXL's rows, not run here) equal what the
    built layer stores, to the few bytes of bitsandbytes' JSON quant-state record."""
    if precision != "fp8":
        pytest.importorskip("bitsandbytes")
    from ldm.models.quantized_base import quantized_class, stored_bytes

    memory = bench_module("memory")
    for in_f, out_f, bias in ((320, 1280, True), (1280, 2560, True), (768, 320, False), (100, 30, True)):
        built = stored_bytes(quantized_class(precision).from_linear(torch.nn.Linear(in_f, out_f, bias=bias)))
        assert memory.quantized_linear_bytes(precision, in_f, out_f, bias) == pytest.approx(built, abs=8)
    with pytest.raises(ValueError, match="unknown precision"):
        memory.quantized_linear_bytes("int4", 8, 8, True)


def test_memory_counted_quantized_row_replaces_the_linear_weights():
    """A counted LoRA-on-quantized-base row is the LoRA estimate with every plain Linear of the base at its stored
    size: the difference is exactly the Linear layers' fp32 bytes less their quantized bytes."""
    from ldm.models.unet import UNet

    memory = bench_module("memory")
    lora = {"row": "lora", "weights": 10 * 2**30, "tracked_peak": 11 * 2**30, "trainable": 1}
    with torch.device("meta"):
        linears = [m for m in UNet.from_preset("tiny").modules() if type(m) is torch.nn.Linear]
    fp32 = sum(4 * (m.weight.numel() + m.out_features * (m.bias is not None)) for m in linears)
    int8 = sum(m.weight.numel() + 4 * m.out_features + 1 + 4 * m.out_features * (m.bias is not None) for m in linears)
    row = memory.counted_quantized("lora_int8", lora, "tiny")
    assert row["row"] == "lora_int8" and row["weights"] == lora["weights"] - fp32 + int8
    assert row["tracked_peak"] - row["weights"] == lora["tracked_peak"] - lora["weights"]


def test_memory_count_mode_adds_up_the_estimator_sums(capsys):
    """bench/memory.py --count: every row from the parameter shapes alone (no run): full AdamW 5 x the weights,
    + EMA 6 x, 8-bit AdamW / Adafactor their exact state, LoRA the adapter's bytes, the activations from the fit."""
    from ldm.models.unet import UNet

    with torch.device("meta"):
        n = sum(p.numel() for p in UNet.from_preset("tiny").parameters())
    rows = bench_module("memory").main(["--presets", "tiny", "--rows", "full_adamw,full_adamw_ema,full_adamw8bit,lora",
                                        "--count", "1024,0,64,0", "--resolution", "32", "--native", "64"])
    by = {r["row"]: r for r in rows}
    w = 4 * n
    assert by["full_adamw"]["weights"] >= w and by["full_adamw"]["tracked_peak"] == 5 * by["full_adamw"]["weights"]
    assert by["full_adamw_ema"]["tracked_peak"] == 6 * by["full_adamw"]["weights"]
    assert by["full_adamw8bit"]["opt_state"] < by["full_adamw"]["opt_state"] / 3
    lora = by["lora"]
    assert lora["trainable"] < n and lora["act_saved"] == 1024 * 16 and lora["act_native"] == 1024 * 64
    assert lora["peak_native"] - lora["tracked_peak"] == 1024 * (64 - 16)
    assert "counted" in capsys.readouterr().out
