"""sample.py: configs/sample.yaml through Hydra's compose API into sample(cfg), on a tiny SD single file."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ldm.pipelines
import ldm.pipelines.cli as cli
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.pipelines.cli import SampleConfigError, sample
from ldm.pipelines.png import read_parameters
from tests.helpers import ROOT
from tests.helpers.sample import config, model, no_loader, pictures  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pngs_are_deterministic_and_carry_their_parameters(model, tmp_path):
    args = ["prompt='a red circle'", "negative_prompt=blue", "n_images=3", "batch_size=2", "seed=5",
            "guidance_scale=4.0"]
    first = sample(config(model, tmp_path / "a", *args))
    second = sample(config(model, tmp_path / "b", *args))
    assert [p.name for p in first] == ["00000.png", "00001.png", "00002.png", "grid.png"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert first[0].read_bytes() != first[1].read_bytes()  # different noise within a batch
    with Image.open(first[2]) as im:
        assert im.size == (16, 16)  # the training resolution from the file's header
        text = im.text["parameters"]
    assert text.startswith("a red circle\nNegative prompt: blue\n")
    for part in ("Steps: 3", "Sampler: ddim", "CFG scale: 4.0", "Seed: 7", "Size: 16x16",
                 f"Model: {model[0].name}"):  # the file name: a PNG is shared, the folders it came from are not
        assert part in text
    params = read_parameters(first[2])
    assert params["seed"] == 7 and params["batch_pos"] == 0  # the second batch starts at image 2: seed 5 + 2
    with Image.open(first[-1]) as grid:
        assert grid.size == (32, 32)


def test_a_batch_of_one_reproduces_an_image_from_its_recorded_seed(model, tmp_path):
    run = sample(config(model, tmp_path / "run", "prompt=a", "n_images=3"))
    again = sample(config(model, tmp_path / "again", "prompt=a", f"seed={read_parameters(run[2])['seed']}"))
    assert again[0].read_bytes() == run[2].read_bytes()


def test_prompt_file_sampler_group_and_sizes(model, pictures, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n")
    paths = sample(config(model, tmp_path / "out", f"prompt_file={prompts}", "sampler=euler_ancestral",
                          "sampler.steps=3", "height=8", "width=24", "grid=false"))
    assert len(paths) == 2
    params = [read_parameters(p) for p in paths]
    assert [p["prompt"] for p in params] == ["a red circle", "a blue square"]
    assert params[0]["sampler"] == "euler_ancestral" and params[0]["karras"] is False and "eta" not in params[0]
    with Image.open(paths[0]) as im:
        assert im.size == (24, 8)


def test_img2img_and_inpainting(model, pictures, tmp_path):
    init = pictures / "init.png"
    out = sample(config(model, tmp_path / "i2i", "prompt=a", f"init_image={init}", "strength=0.5", "grid=false"))
    assert read_parameters(out[0])["strength"] == 0.5
    out = sample(config(model, tmp_path / "small", "prompt=a", f"init_image={init}", "height=8", "width=12"))
    with Image.open(out[0]) as im:
        assert im.size == (12, 8)  # height/width given: the init image is resized to them
    out = sample(config(model, tmp_path / "inpaint", "prompt=a", f"init_image={init}",
                        f"mask={pictures / 'mask.png'}", "grid=false"))
    params = read_parameters(out[0])
    assert params["strength"] == 1.0 and params["mask"].endswith("mask.png")
    result = torch.from_numpy(np.asarray(Image.open(out[0])).copy())
    source = torch.from_numpy(np.asarray(Image.open(init)).copy())
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:12, 4:12] = False
    assert torch.equal(result[outside], source[outside])
    assert not torch.equal(result[~outside], source[~outside])


@pytest.mark.parametrize("overrides, error, match", [
    (["ckpt=/no/such/model.safetensors"], FileNotFoundError, "/no/such/model.safetensors"),
    (["init_image=/no/such/init.png"], FileNotFoundError, "init_image: file not found: /no/such/init.png"),
    (["init_image={pictures}/init.png", "mask=/no/such/mask.png"], FileNotFoundError, "mask: file not found"),
    (["init_image={pictures}/init.png", "mask={pictures}/small_mask.png"], SampleConfigError,
     "mask .* is 8x8 but init_image .* is 16x16"),
    (["mask={pictures}/mask.png"], SampleConfigError, "mask needs init_image"),
    (["init_image={pictures}/init.png", "strength=1.5"], SampleConfigError, r"strength must be in \[0, 1\]"),
    (["strength=-0.1"], SampleConfigError, r"strength must be in \[0, 1\]"),
    (["prompt=null"], SampleConfigError, "no prompt given"),
    (["prompt=null", "prompt_file={tmp}/empty.txt"], SampleConfigError, "has no prompts"),
    (["prompt=null", "prompt_file=/no/such/prompts.txt"], FileNotFoundError, "prompt_file: file not found"),
    (["prompt_file={tmp}/empty.txt"], SampleConfigError, "not both"),
    (["n_images=0"], SampleConfigError, "n_images must be >= 1"),
    (["batch_size=0"], SampleConfigError, "batch_size must be >= 1"),
    (["height=0"], SampleConfigError, "height must be a positive"),
    (["sampler=euler", "sampler.eta=0.5"], SampleConfigError, "eta=0.5 only applies"),
    (["sampler.name=heun"], SampleConfigError, "unknown sampler 'heun'"),
    (["sampler.steps=0"], SampleConfigError, "sampler.steps must be >= 1"),
    (["dtype=float8"], SampleConfigError, "unknown dtype 'float8'"),
    (["text_encoder=/no/such/clip"], FileNotFoundError, "text_encoder: folder not found"),
    (["prediction_type=v"], SampleConfigError, "prediction_type must be one of"),
    (["max_chunks=0"], SampleConfigError, r"max_chunks must be in \[1, 64\]"),
])
def test_bad_input_fails_before_the_model_loads(model, pictures, tmp_path, monkeypatch, overrides, error, match):
    (tmp_path / "empty.txt").write_text("\n  \n")
    monkeypatch.setattr(cli, "load_bundle", no_loader)
    overrides = [o.format(pictures=pictures, tmp=tmp_path) for o in overrides]
    cfg = config(model, tmp_path / "out", "prompt=a", *overrides)
    with pytest.raises(error, match=match):
        sample(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, match", [
    (["height=18"], r"height/width: .*multiples of 4 .* got 18x16"),
    (["init_image={pictures}/odd.png"], r"height/width \(of init_image\): .* got 18x16"),
    (["sampler.steps=1001"], "sampler.steps must be <= 1000"),
])
def test_sizes_the_model_cannot_take_fail_before_sampling(model, pictures, tmp_path, monkeypatch, overrides, match):
    for name in ("text_to_image", "image_to_image", "inpaint"):
        monkeypatch.setattr(ldm.pipelines, name, no_loader)
    cfg = config(model, tmp_path / "out", "prompt=a", "width=16", *[o.format(pictures=pictures) for o in overrides])
    with pytest.raises(SampleConfigError, match=match):
        sample(cfg)


def test_unknown_keys_are_rejected(model, tmp_path):
    with pytest.raises(SampleConfigError, match="promt"):
        sample({"ckpt": str(model[0]), "promt": "a typo"})
    with pytest.raises(Exception, match="promt"):
        config(model, tmp_path, "promt=a")  # Hydra refuses it
    with pytest.raises(SampleConfigError, match="promt"):
        sample(config(model, tmp_path, "+promt=a"))  # forced in: the schema refuses it
    with pytest.raises(SampleConfigError, match="no model given: set ckpt="):
        sample({"prompt": "a"})


@pytest.mark.slow
def test_the_real_command_line(model, tmp_path):
    ckpt, clip = model
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", f"text_encoder={clip}",
                          "prompt='a red circle'", "sampler.steps=2", f"out_dir={tmp_path}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "grid.png"]
    assert read_parameters(tmp_path / "00000.png")["prompt"] == "a red circle"


def test_a_batch_that_would_not_fit_is_refused_before_sampling_naming_what_to_lower(model, tmp_path, monkeypatch):
    import ldm.pipelines.memory as memory

    for name in ("text_to_image", "image_to_image", "inpaint"):
        monkeypatch.setattr(ldm.pipelines, name, no_loader)
    ckpt, clip = model
    bundle = cli.load_bundle(str(ckpt), text_encoder=str(clip), device="cpu")
    fits = memory.check_fits(bundle, 4, 64, 64, guidance=True, available=(1e12, "test"))
    # a quarter of the batch, or a quarter of the pixels, needs about a quarter of the memory
    assert memory.check_fits(bundle, 1, 64, 64, True, available=(1e12, ""))["needed"] == pytest.approx(
        fits["needed"] / 4, rel=1e-6)
    assert memory.check_fits(bundle, 4, 32, 32, True, available=(1e12, ""))["needed"] < fits["needed"] / 3.5
    monkeypatch.setattr(memory, "available_bytes", lambda device: (fits["needed"] / 3, "available RAM"))
    cfg = config(model, tmp_path / "out", "prompt=a", "n_images=4", "batch_size=4", "height=64", "width=64")
    with pytest.raises(SampleConfigError, match=r"trained at 16x16\) needs about .* MiB .* Lower it: batch_size=1 or "
                                                r"batch_size=1 height=\d+ width=\d+"):
        sample(cfg)
    assert not list((tmp_path / "out").glob("*.png")), "nothing was sampled"
    monkeypatch.setattr(ldm.pipelines, "text_to_image", lambda *a, **k: torch.zeros(1, 3, 64, 64))
    sample(config(model, tmp_path / "ok", "prompt=a", "height=64", "width=64", "check_memory=false", "grid=false"))


def test_long_prompt_and_negative_prompt_padded_to_the_same_chunks(model, tmp_path, monkeypatch):
    """max_chunks=3: a 150-token prompt is two 77-token chunks; the short negative prompt is padded to two with
    the empty prompt's chunk, and both CFG branches reach the U-Net in one batch of 154 tokens."""
    words = "a red green blue circle square triangle star on white black background".split()
    long = " ".join(words[i % len(words)] for i in range(150))
    seen = []

    def recording_loader(*args, **kwargs):
        bundle = load_bundle(*args, **kwargs)
        bundle.unet.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[2].detach().clone()))
        return bundle

    load_bundle = cli.load_bundle
    monkeypatch.setattr(cli, "load_bundle", recording_loader)
    args = [f"prompt='{long}'", "negative_prompt=blue", "guidance_scale=4.0", "sampler.steps=2",
            "check_memory=false"]  # its probe call runs the U-Net on the empty prompt
    long_run = sample(config(model, tmp_path / "long", *args, "max_chunks=3"))
    te = CLIPTextEncoder.from_pretrained(model[1], max_chunks=3)
    assert seen and all(c.shape == (2, 154, 32) for c in seen)
    uncond, cond = seen[0].chunk(2)
    torch.testing.assert_close(cond, te([long]), atol=1e-5, rtol=0)
    torch.testing.assert_close(uncond, te.pad_context(te(["blue"]), 154), atol=1e-5, rtol=0)
    torch.testing.assert_close(uncond[:, 77:], te.empty_context(1), atol=1e-5, rtol=0)
    seen.clear()
    short_run = sample(config(model, tmp_path / "short", *args))  # the model's max_chunks (1): cut to 75 tokens
    assert all(c.shape == (2, 77, 32) for c in seen)
    assert long_run[0].read_bytes() != short_run[0].read_bytes()
