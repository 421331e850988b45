"""What ComfyUI makes of our single files (ldm/formats/comfyui_check.py, after ComfyUI's model_detection.py and
supported_models.py): SD1.5 / SD2 / SDXL shapes are detected as such, our tiny / small presets are not ("Could not
detect model type"), an SD1 shape with another head count loads but computes otherwise; `--format single-file`
refuses what ComfyUI cannot load and names --format diffusers, unless --allow-unloadable. Configs only: the full-size
models are never built."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextConfig

from ldm.cli.export import main as export_main
from ldm.diffusion.schedules import NoiseSchedule
from ldm.formats.comfyui_check import (CLIP_G, CLIP_H, CLIP_L, ComfyCheck, comfyui_check, comfyui_check_bundle,
                                        input_block_depths)
from ldm.formats.common import ExportError
from ldm.formats.exporter import _how_to_load, export
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.unet import UNET_PRESETS, UNet, UNetConfig
from tests.helpers.models import bundle, clip_folder  # noqa: F401 - fixtures

SD_SCHEDULE = NoiseSchedule.make("scaled_linear")  # SD's: 0.00085 -> 0.012, 1000 steps, epsilon


def unet(preset: str, **overrides) -> dict:
    return dataclasses.asdict(UNetConfig(**{**UNET_PRESETS[preset], **overrides}))


def vae(**overrides) -> dict:
    return dataclasses.asdict(AutoencoderConfig(**overrides))


def clip(reference: dict, **overrides) -> CLIPTextConfig:
    return CLIPTextConfig(**{"num_hidden_layers": 24, **reference, **overrides})


def sd15(**unet_overrides):
    return comfyui_check(unet("sd15", **unet_overrides), vae=vae(), text=[(clip(CLIP_L), False)],
                         schedule=SD_SCHEDULE)


def test_sd_shapes_are_detected_as_comfyui_does():
    assert input_block_depths(unet("sdxl")) == [0, 0, 2, 2, 10, 10]  # detect_unet_config's transformer_depth
    assert input_block_depths(unet("sd15")) == [1, 1, 1, 1, 1, 1, 0, 0]
    check = sd15()
    assert (check.architecture, check.problems, check.loadable) == ("SD1.5", [], True)
    assert sd15(in_channels=9).loadable  # the inpainting variant
    sd2 = comfyui_check(unet("sd21"), vae=vae(), text=[(clip(CLIP_H, num_hidden_layers=23), False)],
                        schedule=NoiseSchedule.make("scaled_linear", prediction_type="v_prediction"))
    assert (sd2.architecture, sd2.problems) == ("SD2", [])  # no weights: SD20's v-prediction guess is not judged
    xl = comfyui_check(unet("sdxl"), vae=vae(scaling_factor=0.13025),
                       text=[(clip(CLIP_L), True), (clip(CLIP_G), True)], schedule=SD_SCHEDULE)
    assert (xl.architecture, xl.problems) == ("SDXL", [])
    # SSD-1B's depths are one of ComfyUI's distilled SDXL shapes; another depth is not
    assert comfyui_check(unet("sdxl", transformer_depth=(0, 2, 4))).architecture == "SDXL"
    assert comfyui_check(unet("sdxl", transformer_depth=(0, 2, 3))).architecture is None


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_our_small_presets_are_not_detected(preset):
    check = comfyui_check(unet(preset), vae=vae(), schedule=SD_SCHEDULE)
    assert check.architecture is None and not check.loadable
    assert "Could not detect model type" in check.verdict() and "model_channels=64" in check.verdict()


@pytest.mark.parametrize("overrides,field", [
    (dict(num_heads=4), "num_heads=4"),  # SD1: ComfyUI builds 8 heads at every level
    (dict(num_heads=-1, num_head_channels=64), "num_head_channels=64"),  # SD2's rule on an SD1 shape: 5/10/20 heads
])
def test_an_sd1_shape_with_another_head_count_loads_but_computes_otherwise(overrides, field):
    check = sd15(**overrides)
    assert check.architecture == "SD1.5" and not check.loadable
    assert field in check.problems[0] and "computes with 8" in check.problems[0]
    # num_head_channels=40 is 8 heads at 320 channels but 16 at 640: still not SD1's
    assert not sd15(num_heads=-1, num_head_channels=40).loadable
    sd2_wrong = comfyui_check(unet("sd21", num_heads=8, num_head_channels=-1))
    assert sd2_wrong.architecture == "SD2" and "num_heads=8" in sd2_wrong.problems[0]


def test_what_the_shapes_do_not_show_is_named():
    scale = comfyui_check(unet("sd15"), vae=vae(scaling_factor=0.2))
    assert scale.problems == ["autoencoder scaling_factor=0.2: ComfyUI's SD1.5 VAE has scaling_factor=0.18215"]
    v = comfyui_check(unet("sd15"), schedule=NoiseSchedule.make("scaled_linear", prediction_type="v_prediction"))
    assert v.problems == ["prediction_type=v_prediction: ComfyUI runs this SD1.5 file as a epsilon model"]
    cosine = comfyui_check(unet("sd15"), schedule=NoiseSchedule.make("cosine"))
    assert any("schedule kind=cosine" in p for p in cosine.problems)
    te = comfyui_check(unet("sd15"), text=[(clip(CLIP_L, num_hidden_layers=6), False)])
    assert te.problems == ["text_encoder num_hidden_layers=6: ComfyUI's SD1.5 builds num_hidden_layers=12"]
    skip = comfyui_check(unet("sd15"), text=[(clip(CLIP_L), True)])
    assert skip.loadable and "CLIPSetLastLayer" in skip.notes[0]  # CLIP skip 2 is a user setting, not a refusal


def test_sd2_prediction_follows_comfyuis_weight_probe():
    """SD20.model_type: std of output_blocks.11.1.transformer_blocks.0.norm1.bias > 0.09 -> v-prediction."""
    eps = NoiseSchedule.make("scaled_linear")
    flat, spread = torch.zeros(320), torch.linspace(-1, 1, 320)
    probe = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    assert comfyui_check(unet("sd21"), schedule=eps, weight={probe: flat}.get).loadable
    wrong = comfyui_check(unet("sd21"), schedule=eps, weight={probe: spread}.get)
    assert wrong.problems == ["prediction_type=epsilon: ComfyUI runs this SD2 file as a v_prediction model"]


def test_single_file_export_refuses_what_comfyui_cannot_load(bundle, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "m.safetensors"
    with pytest.raises(ExportError, match="Could not detect model type.*--format diffusers.*--allow-unloadable"):
        export(bundle, "single-file", out, resolution=16)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written
    result = export(bundle, "single-file", out, resolution=16, allow_unloadable=True)
    assert out.is_file() and any("--allow-unloadable: ComfyUI cannot load it" in n for n in result.notes)
    assert not any("models/checkpoints" in n for n in result.notes)  # no promise that ComfyUI loads it
    # the CLI: exit 1 with the reason, then written with the flag; other formats are not judged by ComfyUI's rules
    source = export(bundle, "ldm", tmp_path / "bundle", resolution=16).paths[0]
    assert export_main([str(source), "--format", "single-file", "--out", str(tmp_path / "c.safetensors")]) == 1
    assert "--format diffusers" in capsys.readouterr().err and not (tmp_path / "c.safetensors").exists()
    assert export_main([str(source), "--format", "single-file", "--out", str(tmp_path / "c.safetensors"),
                        "--allow-unloadable"]) == 0
    assert "ComfyUI cannot load it" in capsys.readouterr().out


def test_an_sd15_shaped_bundle_on_the_meta_device_is_loadable():
    """The bundle path (configs and weights read off the networks) on SD1.5's real sizes, never allocated."""
    with torch.device("meta"):
        unet, vae_net = UNet.from_preset("sd15"), AutoencoderKL.from_preset("sd")
    te = SimpleNamespace(model=SimpleNamespace(config=clip(CLIP_L)), penultimate=False)
    sd = SimpleNamespace(unet=unet, autoencoder=vae_net, text_encoder=te, schedule=SD_SCHEDULE)
    assert comfyui_check_bundle(sd).loadable
    assert comfyui_check_bundle(sd, frozen=False).loadable  # ComfyUI's UNETLoader: the U-Net rules only
    note = _how_to_load("single-file", Path("m.safetensors"), sd, comfy=comfyui_check_bundle(sd))
    assert note.startswith("ComfyUI detects it as SD1.5: put m.safetensors in models/checkpoints")
    refused = _how_to_load("single-file", Path("m.safetensors"), sd, comfy=ComfyCheck(None, ["no match"]))
    assert "cannot load" in refused and "models/checkpoints" not in refused
