"""bench/first_epoch.py: ldm's train.py (latent cache cold) against diffusers' train_text_to_image.py. The tests run
ldm's side only (diffusers' script is not part of the repo) and check that both commands ask for the same run."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers.bench import bench_module


def option(command: list[str], name: str) -> str:
    """The value of ``name=...`` or ``--name=...`` in a command."""
    values = [a.split("=", 1)[1] for a in command if a.split("=", 1)[0] in (name, f"--{name}")]
    assert len(values) == 1, (name, command)
    return values[0]


def test_both_commands_ask_for_the_same_run(tmp_path):
    first_epoch = bench_module("first_epoch")
    args = first_epoch.parse_args(["--size", "tiny", "--images", "12", "--batch", "3", "--resolution", "32",
                                   "--workers", "2"])
    args.steps = 4
    ours = first_epoch.ldm_command(tmp_path / "m", tmp_path / "i", tmp_path / "r", tmp_path / "c", args)
    theirs = first_epoch.diffusers_command(tmp_path / "s.py", tmp_path / "m", tmp_path / "i", tmp_path / "d", args)
    pairs = [("trainer.max_steps", "max_train_steps"), ("data.batch_size", "train_batch_size"),
             ("data.train.resolution", "resolution"), ("optim.lr", "learning_rate"),
             ("optim.weight_decay", "adam_weight_decay"), ("trainer.gradient_clip_val", "max_grad_norm"),
             ("lr_scheduler.warmup_steps", "lr_warmup_steps"), ("data.num_workers", "dataloader_num_workers"),
             ("model.pretrained", "pretrained_model_name_or_path"), ("data.train.root", "train_data_dir")]
    for ldm_key, diffusers_key in pairs:
        a, b = option(ours, ldm_key), option(theirs, diffusers_key)
        assert a == b or math.isclose(float(a), float(b)), (ldm_key, a, diffusers_key, b)
    assert option(ours, "trainer.precision") == "32" and option(theirs, "mixed_precision") == "no"
    assert option(ours, "module.ema_decay") == "null" and "--use_ema" not in theirs  # neither keeps an EMA
    assert option(ours, "paths.cache_dir") == str(tmp_path / "c")


def test_images_have_a_caption_each(tmp_path):
    first_epoch = bench_module("first_epoch")
    folder = first_epoch.write_images(tmp_path / "images", 7, 40)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:05d}.jpg" for i in range(7)]
    assert len({r["text"] for r in rows}) == 7 and all((folder / r["file_name"]).is_file() for r in rows)


@pytest.mark.slow  # 16 s quiet, 86 s on a busy 2-core machine: two train.py runs
def test_runs_ldm_cold_then_warm_without_the_diffusers_script(tmp_path, capsys):
    row = bench_module("first_epoch").main(["--size", "tiny", "--images", "4", "--batch", "2", "--steps", "1",
                                            "--resolution", "16", "--source-size", "24", "--pairs", "1", "--warm",
                                            "--threads", "1", "--out", str(tmp_path), "--json",
                                            str(tmp_path / "r.jsonl")])
    out = capsys.readouterr().out
    assert "pair 1: ldm (cold cache)" in out and "ldm (warm cache)" in out and "ratio" not in out.split("pair 1")[1]
    assert row["ldm_cold_s"] > 0 and row["ldm_warm_s"] > 0 and "cold_ratio" not in row
    assert "encoding 4 image(s) once" in (tmp_path / "pair0" / "ldm.log").read_text()
    assert "nothing new to encode" in (tmp_path / "pair0" / "ldm_warm.log").read_text()
    assert (tmp_path / "pair0" / "ldm" / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "r.jsonl").read_text())["pairs"] == 1
