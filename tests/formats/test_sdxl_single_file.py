"""SDXL single files (SGM layout: conditioner.embedders.0.transformer.* = ViT-L, conditioner.embedders.1.model.* =
OpenCLIP bigG with text_projection): sizes inferred from the keys, strict loading, and our writer's round trip."""

import pytest
import torch

from ldm.formats.load import load_bundle
from ldm.formats.safe_load import CheckpointError
from ldm.formats.single_file import infer_unet_config, load_single_file, save_single_file, to_single_file
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_sdxl_clips
from ldm.models.unet import UNet
from tests.helpers.models import TINY_XL, tiny_sdxl_bundle

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_tiny_sdxl_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="module")
def bundle(clips):
    return tiny_sdxl_bundle(clips)


def test_sgm_key_layout(bundle):
    sd = to_single_file(bundle.unet, bundle.autoencoder, bundle.text_encoder)
    te2 = bundle.text_encoder.model_2
    assert "model.diffusion_model.label_emb.0.0.weight" in sd and "model.diffusion_model.label_emb.0.2.bias" in sd
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd
    assert sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    proj = sd["conditioner.embedders.1.model.text_projection"]  # OpenCLIP: x @ text_projection
    torch.testing.assert_close(proj, te2.text_projection.weight.t())
    assert not any(k.startswith("cond_stage_model.") for k in sd)


def test_unet_config_inferred_from_sdxl_keys():
    with torch.device("meta"):
        unet = UNet.from_preset("sdxl")
    inferred = infer_unet_config(unet.state_dict())
    assert {k: inferred[k] for k in inferred} == {k: unet.config[k] for k in inferred}
    assert inferred["transformer_depth"] == [0, 2, 10] and inferred["adm_in_channels"] == 2816


def test_round_trip_through_a_single_file_without_header(bundle, clips, tmp_path):
    """Strip our header: everything (per-level depth, adm, the two encoders, SDXL's VAE scale) comes from the keys."""
    from safetensors.torch import save_file

    path = tmp_path / "sdxl.safetensors"
    save_file(to_single_file(bundle.unet, bundle.autoencoder, bundle.text_encoder), str(path))
    loaded = load_bundle(path, text_encoder=clips, device="cpu", dtype="float32")
    assert isinstance(loaded.text_encoder, DualCLIPTextEncoder)
    assert loaded.meta["kind"] == "sdxl" and loaded.autoencoder.scaling_factor == 0.13025
    # heads are not in the weights: linear projections take SDXL's 64-wide heads (as TINY_XL has)
    assert loaded.unet.config["transformer_depth"] == [0, 1, 2] and loaded.unet.config["adm_in_channels"] == 1552
    for name, ours in [("unet", bundle.unet), ("autoencoder", bundle.autoencoder)]:
        theirs = getattr(loaded, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items()), name
    for a, b in [(bundle.text_encoder.model, loaded.text_encoder.model),
                 (bundle.text_encoder.model_2, loaded.text_encoder.model_2)]:
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert next(loaded.autoencoder.parameters()).dtype == torch.float32


def test_header_file_and_strict_errors(bundle, clips, tmp_path):
    path = save_single_file(tmp_path / "with_header.safetensors", bundle, resolution=16)
    loaded = load_bundle(path, text_encoder=clips, device="cpu", dtype="float32")
    assert loaded.unet.config == bundle.unet.config
    sd = to_single_file(bundle.unet, bundle.autoencoder, bundle.text_encoder)
    del sd["conditioner.embedders.1.model.text_projection"]
    te = DualCLIPTextEncoder.from_pretrained(clips)
    with pytest.raises(CheckpointError, match="text_projection"):
        load_single_file(sd, UNet(**TINY_XL), AutoencoderKL.from_preset("tiny"), te)
    sd15 = {k: v for k, v in sd.items() if not k.startswith("conditioner.")}
    sd15 = {k: v for k, v in sd15.items() if "label_emb" not in k}
    with pytest.raises(CheckpointError, match="DualCLIPTextEncoder"):
        load_single_file(sd15, UNet(**{**TINY_XL, "adm_in_channels": None}), None, te)
