"""LoRA files on the command line: sample.py lora=[FILE:SCALE,...] (ours, kohya's, diffusers') and
python -m ldm.cli.export ... --merge-lora FILE:SCALE, whose export equals the adapter applied at run time."""

import subprocess
import sys

import pytest
import torch

from ldm.formats.lora_files import bundle_roots, save_lora_file
from ldm.formats.load import load_bundle
from ldm.models.lora import LoRAConfig, LoRANetwork
from ldm.pipelines.cli import SampleConfigError, sample
from ldm.pipelines.png import read_parameters
from tests.helpers import ROOT
from tests.helpers.sample import config, model  # noqa: F401 - the tiny SD single file fixture

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_for(bundle, preset="full", seed=0, std=0.3):
    torch.manual_seed(seed)
    net = LoRANetwork.build(bundle_roots(bundle), LoRAConfig(preset=preset, rank=2, text_encoder=True))
    with torch.no_grad():
        for m in net.loras.values():
            m.up.weight.normal_(std=std)
    return net


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):  # noqa: F811
    """A kohya file and a diffusers folder made for the tiny model."""
    root = tmp_path_factory.mktemp("loras")
    bundle = load_bundle(model[0], text_encoder=model[1])
    kohya = save_lora_file(lora_for(bundle, seed=1), bundle_roots(bundle), root / "style.safetensors")
    peft = save_lora_file(lora_for(bundle, "attention", seed=2), bundle_roots(bundle), root / "peft", "peft")
    return kohya, peft.parent


def test_sample_with_loras_changes_the_images_and_records_them(model, loras, tmp_path, capsys):  # noqa: F811
    kohya, peft = loras
    plain = sample(config(model, tmp_path / "plain", "prompt=a", "grid=false"))
    with_lora = sample(config(model, tmp_path / "lora", "prompt=a", "grid=false", f"lora=[{kohya}:0.8,{peft}]"))
    again = sample(config(model, tmp_path / "again", "prompt=a", "grid=false", f"lora=[{kohya}:0.8,{peft}]"))
    assert plain[0].read_bytes() != with_lora[0].read_bytes()
    assert with_lora[0].read_bytes() == again[0].read_bytes()
    # recorded as shareable names: a PNG is shared, the folders of the user's machine are not (issue 25)
    assert read_parameters(with_lora[0])["lora"] == [f"{kohya.name}:0.8", peft.name]
    out = capsys.readouterr().out
    assert "(kohya," in out and "(peft," in out and "scale 0.8" in out
    zero = sample(config(model, tmp_path / "zero", "prompt=a", "grid=false", f"lora=[{kohya}:0]"))
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(zero[0])), np.asarray(Image.open(plain[0])))  # scale 0 = no LoRA
    with pytest.raises(SampleConfigError, match="lora: .*not found"):
        sample(config(model, tmp_path / "bad", "prompt=a", f"lora=[{tmp_path / 'missing.safetensors'}]"))


def test_export_merge_lora_equals_the_runtime_adapter(model, loras, tmp_path):  # noqa: F811
    kohya, _ = loras
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "ldm.export", str(model[0]), "--format", "diffusers", "--out", str(out),
           "--text-encoder", str(model[1]), "--merge-lora", f"{kohya}:0.6"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "LoRA" in run.stdout and "scale 0.6" in run.stdout
    bundle = load_bundle(model[0], text_encoder=model[1])
    from ldm.formats.lora_files import read_lora_file

    net = read_lora_file(kohya, bundle_roots(bundle)).network(bundle_roots(bundle), multiplier=0.6)
    net.attach(bundle_roots(bundle))
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 600]), torch.randn(2, 7, 32, generator=g)
    ids = bundle.text_encoder.tokenize(["a red circle"])
    with torch.no_grad():
        ours, our_ctx = bundle.unet(x, t, c), bundle.text_encoder.encode_ids(ids)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None, local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, our_ctx, atol=1e-5, rtol=1e-5)
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "nope.safetensors")] + ["--force"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "--merge-lora" in bad.stderr and "not found" in bad.stderr
