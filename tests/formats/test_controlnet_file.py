"""ControlNet files: our diffusers folder loads in diffusers' ControlNetModel.from_pretrained unchanged and a folder
diffusers saves loads in ours; the original single file (control_model.*) round-trips with or without our header;
both readers are bounded (checked config, built on the meta device, tensors checked before memory)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.formats.controlnet_file import (
    read_controlnet,
    write_controlnet_folder,
    write_controlnet_single_file,
)
from ldm.formats.safe_load import CheckpointError
from ldm.models.controlnet import ControlNet
from ldm.models.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

SD1 = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=2,
           context_dim=24)


@torch.no_grad()
def random_net(seed=0, **kw):
    net = ControlNet(**{**SD1, **kw}, hint_channels=(8, 16))
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def same(a, b):
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_folder_round_trip_and_diffusers_loads_it_unchanged(tmp_path):
    from diffusers import ControlNetModel

    net = random_net()
    folder = write_controlnet_folder(net, tmp_path / "cn")
    back = read_controlnet(folder)
    assert same(back, net) and back.config == net.config
    ref = ControlNetModel.from_pretrained(folder).eval()  # no missing / unexpected keys (it would warn or fail)
    g = torch.Generator().manual_seed(0)
    x, ctx, hint = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 24, generator=g), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        down, mid = net(x, 7, ctx, hint)
        ref_down, ref_mid = ref(x, 7, ctx, hint, return_dict=False)
    torch.testing.assert_close(mid, ref_mid, atol=1e-5, rtol=1e-5)
    # a folder diffusers writes reads back into the same network
    ref.save_pretrained(tmp_path / "theirs")
    assert same(read_controlnet(tmp_path / "theirs"), net)


def test_single_file_round_trip_with_and_without_header(tmp_path):
    net = random_net(seed=1)
    path = write_controlnet_single_file(net, tmp_path / "control.safetensors")
    keys = set(load_file(path))
    assert keys == {"control_model." + k for k in net.state_dict()}
    assert same(read_controlnet(path), net)
    # an original file stores no config: the base U-Net's, with the hint encoder read from the shapes
    plain = tmp_path / "control_v11_like.safetensors"
    save_file({"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}, str(plain))
    with pytest.raises(CheckpointError, match="give the base model"):
        read_controlnet(plain)
    assert same(read_controlnet(plain, UNet(**SD1).config), net)


def test_readers_refuse_bad_files_before_building(tmp_path):
    net = random_net()
    folder = write_controlnet_folder(net, tmp_path / "cn")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [2 ** 30, 2 ** 31]}))
    with pytest.raises(CheckpointError, match="outside"):
        read_controlnet(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "global_pool_conditions": True}))
    with pytest.raises(CheckpointError, match="global_pool_conditions"):
        read_controlnet(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "conditioning_embedding_out_channels": [8, 16, 32]}))
    with pytest.raises(CheckpointError, match="ControlNet"):  # the weights do not fit the stated config
        read_controlnet(folder)
    path = write_controlnet_single_file(net, tmp_path / "c.safetensors")
    state = load_file(path)
    save_file(state, str(tmp_path / "evil.safetensors"),
              metadata={"ldm_controlnet_config": json.dumps({**net.config, "model_channels": 10 ** 9})})
    with pytest.raises(CheckpointError, match="outside"):
        read_controlnet(tmp_path / "evil.safetensors")
    with pytest.raises(CheckpointError, match="neither"):
        read_controlnet(tmp_path / "missing")
