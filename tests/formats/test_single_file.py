"""Original SD single-file checkpoints: split, load, write."""

import pytest
import torch
from safetensors.torch import save_file

from ldm.formats.diffusers_keys import unet_diffusers_config
from ldm.formats.openclip_keys import hf_to_openclip
from ldm.formats.safe_load import CheckpointError
from ldm.formats.single_file import load_single_file, split_sd_checkpoint, to_single_file
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import CLIPTextEncoder, to_hub_keys
from ldm.models.tiny_clip import write_tiny_clip
from ldm.models.unet import UNet
from tests.helpers.models import randomize

pytestmark = pytest.mark.usefixtures("one_thread")



def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def sd1_modules(clip_folder, seed):
    te = CLIPTextEncoder.from_pretrained(clip_folder)
    return (randomize(UNet.from_preset("tiny"), seed), randomize(AutoencoderKL.from_preset("tiny"), seed),
            randomize(te, seed))


def gelu_text_encoder(layers, seed):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=48, eos_token_id=49, pad_token_id=0)
    return CLIPTextEncoder(randomize(CLIPTextModel(cfg), seed), tokenizer=None)


def test_sd1_round_trip(tmp_path, clip_folder):
    unet, vae, te = sd1_modules(clip_folder, seed=1)
    sd = to_single_file(unet, vae, te)
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    sd["alphas_cumprod"] = torch.linspace(1, 0, 10)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "sd1.safetensors"
    save_file(sd, str(path))

    unet2, vae2, te2 = sd1_modules(clip_folder, seed=2)
    assert not same(unet, unet2)
    info = load_single_file(path, unet2, vae2, te2)
    assert info == {"kind": "sd1", "extra": ["alphas_cumprod"]}
    assert same(unet, unet2) and same(vae, vae2) and same(te, te2)
    torch.testing.assert_close(te2(["a red circle"]), te(["a red circle"]))


def test_single_file_loads_into_diffusers(clip_folder):
    """What we write is what diffusers' own single-file converters read."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint

    unet, vae, te = sd1_modules(clip_folder, seed=3)
    sd = to_single_file(unet, vae, te)
    dcfg = unet_diffusers_config(unet.config, sample_size=8)
    theirs = diffusers.UNet2DConditionModel.from_config(dcfg).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(sd, dcfg), strict=True)
    x, ctx = torch.randn(1, 4, 8, 8), te(["a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(unet.eval()(x, 10, ctx), theirs(x, 10, ctx).sample, rtol=1e-4, atol=1e-5)
    assert convert_ldm_clip_checkpoint(sd).keys() == te.hub_state_dict().keys()


def test_sd2_openclip_layout_and_unused_last_block():
    unet = randomize(UNet.from_preset("tiny", use_linear_projection=True, num_heads=-1, num_head_channels=16), 0)
    te = gelu_text_encoder(layers=2, seed=0)
    sd = to_single_file(unet, None, te)
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in sd
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd)
    assert split_sd_checkpoint(sd)["kind"] == "sd2"

    # a real SD2 file: one more (unused) OpenCLIP block, text_projection, logit_scale
    full = gelu_text_encoder(layers=3, seed=5)
    oc = hf_to_openclip(to_hub_keys(full.model.state_dict()))
    oc.update({"text_projection": torch.randn(32, 32), "logit_scale": torch.tensor(4.6)})
    file = {**{"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
            **{"cond_stage_model.model." + k: v for k, v in oc.items()}}
    target = gelu_text_encoder(layers=2, seed=9)
    info = load_single_file(file, UNet.from_preset("tiny", use_linear_projection=True, num_heads=-1,
                                                   num_head_channels=16), text_encoder=target)
    assert info["kind"] == "sd2"
    assert info["extra"] == ["cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection"]
    want = {k: v for k, v in full.model.state_dict().items() if ".layers.2." not in k}
    got = target.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # penultimate of the full model == the loaded 2-layer model (SD2 conditioning)
    ids = torch.randint(0, 48, (1, 77), generator=torch.Generator().manual_seed(0))
    full.penultimate = True
    torch.testing.assert_close(target.encode_ids(ids), full.encode_ids(ids), rtol=1e-4, atol=1e-5)


def test_kind_from_unet_and_ema():
    unet = UNet.from_preset("tiny", use_linear_projection=True, num_heads=-1, num_head_channels=16)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    assert split_sd_checkpoint(sd)["kind"] == "sd2"
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in sd.items()}
    parts = split_sd_checkpoint({**sd, **ema}, use_ema=True)
    key = "input_blocks.0.0.bias"
    assert torch.equal(parts["unet"][key], unet.state_dict()[key] + 1)
    with pytest.raises(CheckpointError, match="no EMA copy"):
        split_sd_checkpoint(sd, use_ema=True)
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        split_sd_checkpoint({"foo": torch.zeros(1)})


def test_mismatch_is_one_error_and_loads_nothing(tmp_path, clip_folder):
    unet, vae, te = sd1_modules(clip_folder, seed=1)
    path = tmp_path / "sd.safetensors"
    save_file(to_single_file(unet, vae), str(path))
    unet2 = randomize(UNet.from_preset("tiny"), 7)
    before = {k: v.clone() for k, v in unet2.state_dict().items()}
    wrong_vae = AutoencoderKL.from_preset("tiny", latent_channels=8)
    with pytest.raises(CheckpointError) as err:
        load_single_file(path, unet2, wrong_vae, te)
    msg = str(err.value)
    assert str(path) in msg and "vae:" in msg and "mis-shaped" in msg
    assert "text_encoder:" in msg and "missing keys" in msg  # file has no text encoder
    assert "unet:" not in msg
    assert all(torch.equal(before[k], v) for k, v in unet2.state_dict().items())
