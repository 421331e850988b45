"""``python -m ldm.export ... --verify`` on SD3 and Flux exports: the export is reloaded as its consumers do (ours;
diffusers' StableDiffusion3Pipeline / FluxPipeline from_pretrained, StableDiffusion3Pipeline.from_single_file) and
sampled with flow-Euler like the source; a tampered export fails naming the consumers that read it. Tiny random
models, offline, in tmp_path."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.cli.export import VERIFY_FAILED, main
from ldm.evaluation.export_check import TOLERANCES, VerifySettings, verify_export
from ldm.formats.exporter import export
from ldm.formats.load import load_bundle
from tests.helpers.flux import write_tiny_flux_folder
from tests.helpers.models import perturbed
from tests.helpers.sd3 import write_tiny_sd3_folder

pytestmark = pytest.mark.usefixtures("one_thread")
diffusers = pytest.importorskip("diffusers")

CPU = VerifySettings(device="cpu", steps=4)
RES = 16  # the folders record FluxPipeline's / SD3's 1024-ish default; a tiny model is checked at 16 px


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return write_tiny_flux_folder(tmp_path_factory.mktemp("flux"))[0]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return write_tiny_sd3_folder(tmp_path_factory.mktemp("sd3"))[0]


def consumers(report):
    return {c.consumer: c for c in report.comparisons}


def scale_tensor(path, key, factor):
    state = load_file(path)
    state[key] = state[key] * factor
    save_file(state, path)


@pytest.mark.parametrize("which,fmt", [("flux", "diffusers"), ("sd3", "diffusers"), ("sd3", "single-file")])
def test_a_good_transformer_export_verifies_in_each_consumer(which, fmt, request, tmp_path):
    bundle = perturbed(load_bundle(request.getfixturevalue(which)))
    if which == "sd3" and fmt == "single-file":  # SD3 pools CLIP-L unprojected: from_single_file sets it to eye
        with torch.no_grad():
            bundle.text_encoder.model.text_projection.weight.copy_(torch.eye(32))
    bundle.text_encoder.t5_length = 8  # another T5 length than the pipelines' default: given as max_sequence_length
    out = tmp_path / ("model.safetensors" if fmt == "single-file" else "folder")
    result = export(bundle, fmt, out, resolution=RES, allow_unloadable=True)
    report = verify_export(result, settings=CPU)
    assert report.passed, report.summary()
    pipeline = "diffusers from_single_file" if fmt == "single-file" else "diffusers from_pretrained"
    found = consumers(report)
    assert set(found) == {"ldm load_bundle", pipeline}
    for c in found.values():
        assert c.skipped is None and c.max_abs <= 1e-5, report.summary()
    assert "max_sequence_length=8" in found[pipeline].how or fmt == "single-file"
    assert "flow-Euler 4 steps" in report.header


def test_a_spoiled_flux_export_fails_in_both_consumers(flux, tmp_path):
    bundle = load_bundle(flux)
    result = export(bundle, "diffusers", tmp_path / "folder", resolution=RES)
    scale_tensor(tmp_path / "folder" / "transformer" / "diffusion_pytorch_model.safetensors", "proj_out.weight", -1.0)
    report = verify_export(result, settings=CPU)
    failed = {c.consumer for c in report.failures()}
    assert failed == {"ldm load_bundle", "diffusers from_pretrained"}, report.summary()
    assert all(c.psnr < TOLERANCES["fp32"].min_psnr - 10 for c in report.failures()), report.summary()


def test_flux_without_t5_skips_the_pipeline_and_says_why(flux, tmp_path):
    bundle = load_bundle(flux)
    bundle.text_encoder.drop_t5()
    result = export(bundle, "diffusers", tmp_path / "folder", resolution=RES)
    report = verify_export(result, settings=CPU)
    assert report.passed, report.summary()
    assert "its T5 (text_encoder_2)" in consumers(report)["diffusers from_pretrained"].skipped


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_cli_verify_on_sd3_and_flux(which, request, tmp_path, capsys, monkeypatch):
    """``python -m ldm.export <folder> --format diffusers --verify``: 0 and each consumer's line; a writer that
    spoils the transformer it writes: exit 3 naming the consumers."""
    import ldm.formats.exporter as exporter

    folder = request.getfixturevalue(which)
    args = [str(folder), "--format", "diffusers", "--resolution", str(RES), "--verify", "--verify-device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert "verify: passed" in out and "diffusers from_pretrained" in out
    name = "write_flux_diffusers" if which == "flux" else "write_sd3_diffusers"
    write = getattr(exporter, name)

    def spoiled(bundle, path, **kwargs):
        written = write(bundle, path, **kwargs)
        scale_tensor(path / "transformer" / "diffusion_pytorch_model.safetensors", "proj_out.weight", -1.0)
        return written

    monkeypatch.setattr(exporter, name, spoiled)
    assert main([*args, "--out", str(tmp_path / "bad")]) == VERIFY_FAILED
    err = capsys.readouterr().err
    assert "verify: FAILED: diffusers from_pretrained differs" in err and "verify: FAILED: ldm load_bundle" in err


def test_a_merged_flux_lora_verifies_in_load_lora_weights(flux, tmp_path, capsys):
    """--merge-lora of a Flux LoRA in diffusers' layout: FluxPipeline.load_lora_weights on the unmerged export (the
    file applied at run time) samples like ldm's merge."""
    from ldm.formats.lora_files import save_lora_file
    from tests.helpers.lora import roots, trained

    bundle = load_bundle(flux)
    net = trained(bundle, preset="attention_ff", rank=2, alpha=4.0, text_encoder=True)
    lora = save_lora_file(net, roots(bundle), tmp_path / "lora", "peft")
    args = [str(flux), "--format", "diffusers", "--resolution", str(RES), "--verify", "--verify-device", "cpu",
            "--merge-lora", f"{lora}:0.8", "--out", str(tmp_path / "merged")]
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "diffusers load_lora_weights" in x)
    assert line.endswith("ok") and "verify: passed" in out, out
    merged = load_bundle(tmp_path / "merged").unet.state_dict()
    moved = [k for k, v in bundle.unet.state_dict().items() if (v - merged[k]).abs().max() > 1e-3]
    assert len(moved) >= 8  # the LoRA changed the weights it samples with (load_lora_weights matched them)
