"""sample.py with ControlNets: controlnet=<folder or control_model.* file> control_image=<png> (one or a list, with
scales and guidance ranges) gives the pipeline's images; bad options fail before the model loads."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.formats.controlnet_file import write_controlnet_folder, write_controlnet_single_file
from ldm.formats.load import load_bundle
from ldm.models.controlnet import ControlNet
from ldm.pipelines import text_to_image
from ldm.pipelines.cli import SampleConfigError, sample
from ldm.pipelines.controlnet import Control
from ldm.pipelines.png import read_parameters
from ldm.pipelines.sampling_options import SamplingOptions
from tests.helpers.sample import config, model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def controlnets(model, tmp_path_factory):  # noqa: F811
    ckpt, clip = model
    root = tmp_path_factory.mktemp("cn")
    bundle = load_bundle(ckpt, text_encoder=clip, device="cpu", dtype="float32")
    net = ControlNet.from_unet(bundle.unet, hint_channels=(8, 16))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("zero_convs", "middle_block_out", "input_hint_block")):
                p.copy_(3.0 * torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.ndim > 1 else 1))
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[4:12, 2:10] = 255
    Image.fromarray(pixels).save(root / "control.png")
    return (bundle, net, write_controlnet_folder(net, root / "folder"),
            write_controlnet_single_file(net, root / "control_model.safetensors"), root / "control.png")


def pngs(paths):
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths if p.name != "grid.png"])


def test_sample_py_controlnet_equals_the_pipeline(model, controlnets, tmp_path):  # noqa: F811
    bundle, net, folder, single, png = controlnets
    common = ["prompt='a red circle'", "height=16", "width=16", "seed=4", "guidance_scale=3", "grid=false"]
    by_folder = pngs(sample(config(model, tmp_path / "a", *common, f"controlnet={folder}", f"control_image={png}",
                                   "control_scale=0.9", "control_end=0.8")))
    by_file = pngs(sample(config(model, tmp_path / "b", *common, f"controlnet=[{single}]", f"control_image=[{png}]",
                                 "control_scale=[0.9]", "control_end=0.8")))
    plain = pngs(sample(config(model, tmp_path / "c", *common)))
    hint = torch.from_numpy(np.asarray(Image.open(png), np.float32) / 255).permute(2, 0, 1)[None]
    ref = text_to_image(bundle, "a red circle", height=16, width=16, seed=4, guidance_scale=3,
                        sampler=SamplingOptions(steps=3), control=[Control(net, hint, 0.9, 0.0, 0.8)])
    ref = ((ref.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(by_folder, by_file)
    assert np.abs(by_folder.astype(float) - ref).max() <= 1
    assert np.abs(by_folder.astype(int) - plain.astype(int)).max() > 2  # the ControlNet changed the images
    params = read_parameters(tmp_path / "a" / "00000.png")
    assert params["controlnet"] == ["folder:0.9:0.0-0.8"] and params["control_image"] == ["control.png"]


@pytest.mark.parametrize("overrides, message", [
    (["controlnet=[{folder},{folder}]", "control_image={png}"], "one control image per ControlNet"),
    (["controlnet={folder}", "control_image={png}", "control_scale=[1,2]"], "control_scale has 2 values"),
    (["controlnet={folder}", "control_image={png}", "control_start=0.5", "control_end=0.5"], "start < end"),
    (["controlnet=missing_dir", "control_image={png}"], "controlnet: not found"),
])
def test_bad_control_options_fail_before_the_model_loads(model, controlnets, tmp_path, monkeypatch, overrides,
                                                         message):  # noqa: F811
    _, _, folder, _, png = controlnets
    import ldm.pipelines.cli as cli

    monkeypatch.setattr(cli, "load_bundle", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises((SampleConfigError, FileNotFoundError), match=message):
        sample(config(model, tmp_path, "prompt=x", *[o.format(folder=folder, png=png) for o in overrides]))
