"""``python -m ldm.export ... --verify``: every consumer of a good export (ours; diffusers' from_pretrained,
from_single_file and load_lora_weights) samples like the source; a tampered export (a weight scaled, the VAE's
scaling factor changed, the prediction type flipped) fails, naming the consumer that differs and by how much; with
diffusers missing its checks say they were skipped. Tiny random models, offline, in tmp_path."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.cli.export import VERIFY_FAILED, main
from ldm.diffusion.schedules import NoiseSchedule
from ldm.evaluation.export_check import TOLERANCES, VerifySettings, verify_export
from ldm.formats.exporter import export
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.bundle import ModelBundle
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_clip
from ldm.models.unet import UNet
from tests.helpers.models import randomize

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 16
CPU = VerifySettings(device="cpu")
CONSUMERS = {"ldm": ["ldm load_bundle"], "diffusers": ["ldm load_bundle", "diffusers from_pretrained"],
             "single-file": ["ldm load_bundle", "diffusers from_single_file"]}
OUT = {"ldm": "bundle", "diffusers": "folder", "single-file": "model.safetensors"}


def tiny_bundle(clip) -> ModelBundle:
    """A random U-Net (an untrained one's zero output layer would give every prompt the same image) and a VAE
    with its default init (images with contrast, so that a changed latent scale shows)."""
    torch.manual_seed(0)
    unet, vae = randomize(UNet.from_preset("tiny"), 1), AutoencoderKL.from_preset("tiny")
    return ModelBundle(unet, vae, CLIPTextEncoder.from_pretrained(clip), NoiseSchedule.make("scaled_linear"),
                       meta={"resolution": RES}).eval()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def source(clip, tmp_path_factory):
    """What the CLI reads: our bundle of the tiny model (it records its training resolution)."""
    folder = tmp_path_factory.mktemp("source") / "bundle"
    export(tiny_bundle(clip), "ldm", folder)
    return folder


def lines_of(text: str, consumer: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.strip().startswith(consumer))


# --------------------------------------------------------------------------------------------------------------
# a good export passes


@pytest.mark.parametrize("fmt,dtype", [("ldm", "fp32"), ("diffusers", "fp32"), ("single-file", "fp32"),
                                       ("diffusers", "fp16"), ("single-file", "bf16")])
def test_verify_passes_on_a_good_export(source, tmp_path, capsys, fmt, dtype):
    pytest.importorskip("diffusers")
    out = tmp_path / OUT[fmt]
    rc = main([str(source), "--format", fmt, "--out", str(out), "--dtype", dtype, "--verify", "--verify-device", "cpu",
               "--allow-unloadable"])  # a tiny model: ComfyUI would not load its single file
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"verify: 2 prompts at {RES}x{RES}, DDIM 10 steps (leading)" in text
    assert f"verify: passed ({dtype} tolerance: {TOLERANCES[dtype]})" in text
    for consumer in CONSUMERS[fmt]:
        line = lines_of(text, consumer)
        assert re.search(r"max \|diff\| \S+ \(\S+/255\)  mean \S+  PSNR +\S+ dB  ok$", line), text
    if dtype == "fp32":  # the same weights in other code: equal to float32 rounding
        assert all(float(m) < 1e-4 for m in re.findall(r"max \|diff\| ([0-9.e+-]+) ", text)), text


def test_no_diffusers_says_its_checks_were_skipped(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    rc = main([str(source), "--format", "single-file", "--out", str(tmp_path / "m.safetensors"), "--verify",
               "--allow-unloadable",
               "--verify-device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert re.search(r"diffusers from_single_file +skipped: diffusers not installed \(pip install diffusers\)", text)
    assert re.search(r"ldm load_bundle .* ok$", lines_of(text, "ldm load_bundle"))
    assert "verify: passed" in text


def test_verify_needs_the_whole_model(source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(source), "--format", "diffusers", "--out", str(tmp_path / "d"), "--no-frozen", "--verify"])
    assert exit_.value.code == 2 and "drop --no-frozen" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_device_that_does_not_exist_fails_before_writing(source, tmp_path, capsys):
    out = tmp_path / "d"
    assert main([str(source), "--format", "diffusers", "--out", str(out), "--verify", "--verify-device",
                 "nodevice"]) == 1
    assert "error: --verify-device 'nodevice'" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# a tampered export fails, naming the consumer


def scale_tensor(path, key: str, factor: float) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state[key] = state[key] * factor
    save_file(state, str(path), metadata=meta)


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_header(path, key: str, change) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    data = json.loads(meta[key])
    change(data)
    save_file(load_file(str(path)), str(path), metadata={**meta, key: json.dumps(data)})


def flip(d: dict) -> None:
    d.update(prediction_type="v_prediction")


def sdxl_scale(d: dict) -> None:
    d.update(scaling_factor=0.13025)


TAMPER = {  # (format, what) -> (change the written export, the consumers that read what changed)
    ("ldm", "weight"): (lambda o: scale_tensor(o / "model.safetensors", "unet.out.2.weight", 1.5), ["ldm"]),
    ("ldm", "scaling_factor"): (lambda o: edit_json(o / "ldm_bundle.json", lambda d: sdxl_scale(
        d["model"]["autoencoder"])), ["ldm"]),
    ("ldm", "prediction_type"): (lambda o: edit_json(o / "ldm_bundle.json", lambda d: flip(d["schedule"])), ["ldm"]),
    ("diffusers", "weight"): (lambda o: scale_tensor(o / "unet" / "diffusion_pytorch_model.safetensors",
                                                     "conv_out.weight", 1.5), ["ldm", "diffusers"]),
    ("diffusers", "scaling_factor"): (lambda o: edit_json(o / "vae" / "config.json", sdxl_scale), ["ldm", "diffusers"]),
    ("diffusers", "prediction_type"): (lambda o: edit_json(o / "scheduler" / "scheduler_config.json", flip),
                                       ["ldm", "diffusers"]),
    ("single-file", "weight"): (lambda o: scale_tensor(o, "model.diffusion_model.out.2.weight", 1.5),
                                ["ldm", "diffusers"]),
    # the yaml is what diffusers (and ComfyUI / A1111) read the VAE's config from; our loader reads the header
    ("single-file", "scaling_factor"): (lambda o: o.with_suffix(".yaml").write_text(
        o.with_suffix(".yaml").read_text().replace("scale_factor: 0.18215", "scale_factor: 0.13025")), ["diffusers"]),
    # the header's schedule is ours; diffusers takes a single file's scheduler from config= (the source's folder)
    ("single-file", "prediction_type"): (lambda o: edit_header(o, "ldm_schedule", flip), ["ldm"]),
}


@pytest.mark.parametrize("fmt,what", list(TAMPER))
def test_verify_fails_on_a_tampered_export(clip, tmp_path, fmt, what):
    if fmt != "ldm":
        pytest.importorskip("diffusers")
    out = tmp_path / OUT[fmt]
    result = export(tiny_bundle(clip), fmt, out, allow_unloadable=True)
    tamper, readers = TAMPER[(fmt, what)]
    tamper(out)
    report = verify_export(result, settings=CPU)
    failed = {c.consumer.split()[0] for c in report.failures()}
    assert not report.passed and failed == set(readers), report.summary()
    for c in report.failures():  # clearly: far outside the fp32 bound, not a rounding
        assert c.problem is None and c.psnr < TOLERANCES["fp32"].min_psnr - 10, report.summary()
        assert f"verify: FAILED: {c.consumer} differs from ldm's samples of the source: max |diff| " in \
               report.verdict()


def test_samples_that_are_not_finite_fail(clip, tmp_path):
    result = export(tiny_bundle(clip), "ldm", tmp_path / "bundle")
    scale_tensor(tmp_path / "bundle" / "model.safetensors", "unet.out.2.weight", float("nan"))
    report = verify_export(result, settings=CPU)
    assert not report.passed
    assert "verify: FAILED: ldm load_bundle: its samples hold NaN or infinite values" in report.verdict()


def test_cli_exits_3_and_names_the_consumer(source, tmp_path, capsys, monkeypatch):
    """A writer that spoils what it writes (here: the U-Net's output layer of a diffusers folder)."""
    pytest.importorskip("diffusers")
    import ldm.formats.exporter as exporter

    write = exporter.write_diffusers

    def spoiled(bundle, folder, **kwargs):
        written = write(bundle, folder, **kwargs)
        scale_tensor(folder / "unet" / "diffusion_pytorch_model.safetensors", "conv_out.weight", -1.0)
        return written

    monkeypatch.setattr(exporter, "write_diffusers", spoiled)
    out = tmp_path / "folder"
    assert main([str(source), "--format", "diffusers", "--out", str(out), "--verify", "--verify-device", "cpu"]) \
        == VERIFY_FAILED
    captured = capsys.readouterr()
    assert re.search(r"diffusers from_pretrained +max \|diff\| .* DIFFERS$", lines_of(captured.out,
                                                                                      "diffusers from_pretrained"))
    assert "verify: FAILED: diffusers from_pretrained differs from ldm's samples of the source: max |diff|" in \
           captured.err
    assert "verify: FAILED: ldm load_bundle differs" in captured.err
    assert f"error: the export at {out} does not sample like its source (kept for inspection)" in captured.err
    assert (out / "model_index.json").is_file()


# --------------------------------------------------------------------------------------------------------------
# LoRA files merged into the export: diffusers loads them on the unmerged model


def lora_file(bundle, path):
    """A kohya LoRA file as after training (up weights non-zero), on the U-Net and the text encoder."""
    from ldm.formats.lora_files import bundle_roots, save_lora_file
    from ldm.models.lora import LoRAConfig, LoRANetwork

    roots = bundle_roots(bundle)
    torch.manual_seed(3)
    net = LoRANetwork.build(roots, LoRAConfig(preset="attention", rank=4, alpha=4.0, text_encoder=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.loras.values():
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=g))
    return save_lora_file(net.eval(), roots, path, "kohya")


def test_merged_lora_export_verifies_in_load_lora_weights(clip, source, tmp_path, capsys):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    lora = lora_file(tiny_bundle(clip), tmp_path / "lora.safetensors")
    rc = main([str(source), "--format", "diffusers", "--out", str(tmp_path / "merged"), "--merge-lora",
               f"{lora}:0.8", "--verify", "--verify-device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "(U-Net weights: as stored in the source, 1 LoRA file(s) merged)" in text
    for consumer in ("ldm load_bundle", "diffusers from_pretrained", "diffusers load_lora_weights"):
        assert re.search(r"PSNR +\S+ dB  ok$", lines_of(text, consumer)), text
    assert "(1 file(s) on the unmerged model)" in text


def test_load_lora_weights_differs_when_the_merge_does(clip, tmp_path):
    """The merged export at scale 0.8 against the file at scale 0.2 in diffusers: only that consumer differs."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    base = tiny_bundle(clip)
    lora = lora_file(base, tmp_path / "lora.safetensors")
    result = export(base, "single-file", tmp_path / "m.safetensors", merge_lora=[f"{lora}:0.8"], allow_unloadable=True)
    report = verify_export(result, base=base, merge_lora=[f"{lora}:0.2"], settings=CPU)
    assert [c.consumer for c in report.failures()] == ["diffusers load_lora_weights"], report.summary()
    assert report.failures()[0].psnr < 40


# --------------------------------------------------------------------------------------------------------------
# SDXL: StableDiffusionXLPipeline (zero unconditional text, size conditioning) samples like ours


@pytest.mark.parametrize("fmt", ["diffusers", "single-file"])
def test_sdxl_export_verifies(tmp_path, fmt):
    pytest.importorskip("diffusers")
    from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
    from ldm.models.tiny_clip import write_tiny_sdxl_clips
    from tests.helpers.models import TINY_XL

    torch.manual_seed(0)
    vae = AutoencoderKL.from_preset("sdxl", base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    bundle = ModelBundle(randomize(UNet(**TINY_XL), 1), vae,
                         DualCLIPTextEncoder.from_pretrained(write_tiny_sdxl_clips(tmp_path / "clips")),
                         NoiseSchedule.make("scaled_linear"), meta={"vae_fp32": True, "resolution": RES}).eval()
    result = export(bundle, fmt, tmp_path / OUT[fmt], allow_unloadable=True)
    report = verify_export(result, settings=CPU)
    assert report.passed and len(report.comparisons) == 2, report.summary()
    assert "StableDiffusionXLPipeline" in report.comparisons[1].how
    assert all(c.max_abs < 1e-4 for c in report.comparisons), report.summary()


@pytest.mark.parametrize("fmt", ["diffusers", "single-file"])
def test_sd2_like_export_verifies(clip, tmp_path, fmt):
    """v prediction with zero terminal SNR (trailing timesteps), a penultimate-layer gelu (OpenCLIP-layout) text
    encoder and linear projections: the settings an SD 2 fine-tune exports."""
    pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(clip / "tokenizer")
    ids = CLIPTextModel.from_pretrained(clip / "text_encoder").config
    config = CLIPTextConfig(vocab_size=ids.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, hidden_act="gelu", bos_token_id=ids.bos_token_id,
                            eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id)
    torch.manual_seed(0)
    text = CLIPTextEncoder(randomize(CLIPTextModel(config), 5), tokenizer, penultimate=True)
    unet = randomize(UNet.from_preset("tiny", use_linear_projection=True, num_heads=-1, num_head_channels=16), 1)
    schedule = NoiseSchedule.make("scaled_linear", prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    bundle = ModelBundle(unet, AutoencoderKL.from_preset("tiny"), text, schedule, meta={"resolution": RES}).eval()
    report = verify_export(export(bundle, fmt, tmp_path / OUT[fmt], allow_unloadable=True), settings=CPU)
    assert "DDIM 10 steps (trailing)" in report.header
    assert report.passed and len(report.comparisons) == 2, report.summary()
    assert all(c.max_abs < 1e-4 for c in report.comparisons), report.summary()
