"""SDXL export: the single file (SGM layout) + its sd_xl_base.yaml-style config, reloaded by load_bundle and by
diffusers' StableDiffusionXLPipeline.from_single_file; the ldm bundle with both text encoders."""

import pytest
import torch
import yaml
from safetensors import safe_open

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.formats.common import ExportError
from ldm.formats.diffusers_folder import write_diffusers
from ldm.formats.exporter import export
from ldm.formats.load import load_bundle
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.sdxl_conditioning import default_size_values, unet_conditioning
from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_sdxl_clips
from ldm.models.unet import UNet
from tests.helpers.models import TINY_XL, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16  # pixels: tiny VAE f=2 -> 8x8 latents
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_tiny_sdxl_clips(tmp_path_factory.mktemp("clips"))


def tiny_sdxl(clips, schedule=None) -> ModelBundle:
    vae = AutoencoderKL.from_preset("sdxl", base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    return ModelBundle(randomize(UNet(**TINY_XL), 1), randomize(vae, 2), DualCLIPTextEncoder.from_pretrained(clips),
                       schedule or NoiseSchedule.make("scaled_linear"), meta={"vae_fp32": True})


@pytest.fixture(scope="module")
def bundle(clips):
    return tiny_sdxl(clips)


@pytest.fixture(scope="module")
def single_file(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("sf") / "xl.safetensors"
    result = export(bundle, "single-file", out, resolution=SIZE, allow_unloadable=True)  # tiny: not ComfyUI's SDXL
    assert result.paths == [out, out.with_suffix(".yaml")]
    return out


def unet_out(bundle, text, x):
    with torch.no_grad():
        return bundle.unet(x, 400, unet_conditioning(text, default_size_values(x.shape[0], SIZE, SIZE)))


def latents(n=2):
    return torch.randn(n, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))


def test_single_file_layout_header_and_yaml(bundle, single_file):
    with safe_open(str(single_file), framework="pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert {"model.diffusion_model.label_emb.0.0.weight", "first_stage_model.decoder.conv_out.weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"} <= keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    assert {"ldm_unet_config", "ldm_vae_config", "ldm_schedule", "ldm_text_encoder"} <= set(header)
    assert header["ldm_resolution"] == str(SIZE) and header["ldm_dtype"] == "float32"

    text = single_file.with_suffix(".yaml").read_text()
    assert text.startswith("# SGM")
    model = yaml.safe_load(text)["model"]
    assert model["target"] == "sgm.models.diffusion.DiffusionEngine"
    p = model["params"]
    assert p["scale_factor"] == 0.13025
    unet = p["network_config"]["params"]
    assert p["network_config"]["target"] == "sgm.modules.diffusionmodules.openaimodel.UNetModel"
    assert unet["adm_in_channels"] == TINY_XL["adm_in_channels"] == 16 + 6 * 256
    # the SGM of SDXL 1.0 (generative-models 45c443b, which A1111 instantiates this yaml with)
    assert unet["num_classes"] == "sequential" and unet["legacy"] is False and unet["use_spatial_transformer"]
    assert unet["context_dim"] == 80 and unet["transformer_depth"] == [1, 1, 2]  # level 0: no attention
    assert unet["attention_resolutions"] == [4, 2] and unet["num_head_channels"] == 64
    embedders = p["conditioner_config"]["params"]["emb_models"]
    assert [e["target"].rsplit(".", 1)[1] for e in embedders] == ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"] + [
        "ConcatTimestepEmbedderND"] * 3
    te = bundle.text_encoder
    assert embedders[0]["params"] == {"layer": "hidden", "layer_idx": te.model.config.num_hidden_layers - 1}
    assert embedders[1]["params"]["layer"] == "penultimate" and embedders[1]["params"]["always_return_pooled"]
    assert [e["input_key"] for e in embedders[2:]] == ["original_size_as_tuple", "crop_coords_top_left",
                                                        "target_size_as_tuple"]
    assert all(e["params"]["outdim"] == 256 for e in embedders[2:])
    denoiser = p["denoiser_config"]["params"]
    assert denoiser["scaling_config"]["target"].endswith("EpsScaling") and denoiser["num_idx"] == 1000
    assert denoiser["weighting_config"]["target"].endswith("EpsWeighting")
    assert p["first_stage_config"]["target"] == "sgm.models.autoencoder.AutoencoderKLInferenceWrapper"
    assert denoiser["discretization_config"]["params"] == {"linear_start": 0.00085, "linear_end": 0.012,
                                                           "num_timesteps": 1000}
    assert p["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 2]


def assert_same_networks(back, bundle) -> None:
    """Both text encoders, the U-Net and the VAE decode of ``back`` equal ``bundle``'s exactly."""
    ours, theirs = bundle.text_encoder(PROMPTS), back.text_encoder(PROMPTS)
    for key in ("crossattn", "pooled"):
        torch.testing.assert_close(theirs[key], ours[key], atol=0, rtol=0)
    x = latents()
    torch.testing.assert_close(unet_out(back, theirs, x), unet_out(bundle, ours, x), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(back.autoencoder.decode_latents(x), bundle.autoencoder.decode_latents(x),
                                   atol=0, rtol=0)


def test_single_file_reloads_exactly(bundle, single_file, clips):
    back = load_bundle(single_file, text_encoder=clips, device="cpu", dtype="float32")
    assert back.unet.config == bundle.unet.config and back.meta["kind"] == "sdxl" and back.meta["resolution"] == SIZE
    assert_same_networks(back, bundle)


def test_single_file_loads_in_diffusers(bundle, single_file, tmp_path):
    """Weights (both text encoders too) from our file, converted by diffusers' own single_file_utils; component
    configs and tokenizers from a local folder: the tiny model's context_dim (80) is not one diffusers' yaml reader
    recognises as SDXL (it asks for 2048 / 1280), so original_config would give it a class embedding instead of
    SDXL's add_embedding. The SDXL preset's yaml is checked against that reader in the next test."""
    diffusers = pytest.importorskip("diffusers")
    write_diffusers(bundle, tmp_path / "config", resolution=SIZE)
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(str(single_file), config=str(tmp_path / "config"),
                                                                local_files_only=True, add_watermarker=False)
    pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    ours = bundle.text_encoder(PROMPTS)
    torch.testing.assert_close(pe, ours["crossattn"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ours["pooled"], atol=1e-5, rtol=1e-5)
    x = latents()
    with torch.no_grad():
        ref = pipe.unet(x, 400, encoder_hidden_states=pe,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": default_size_values(2, SIZE, SIZE)})
    torch.testing.assert_close(ref.sample, unet_out(bundle, ours, x), atol=1e-5, rtol=1e-5)


def test_sdxl_preset_yaml_reads_like_sd_xl_base_in_diffusers():
    """The real SDXL sizes (meta tensors): our yaml gives diffusers' yaml reader our U-Net / VAE configs."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from ldm.formats.diffusers_keys import unet_diffusers_config, vae_diffusers_config
    from ldm.formats.single_file import _original_heads
    from ldm.formats.sgm_config import sgm_config

    with torch.device("meta"):
        unet, vae = UNet.from_preset("sdxl"), AutoencoderKL.from_preset("sdxl")
    config = sgm_config(unet.config, vae.config, NoiseSchedule.make("scaled_linear"),
                        heads=_original_heads(unet.config), vit_l_layers=12, pooled_dim=1280, resolution=1024)
    p = config["model"]["params"]["network_config"]["params"]
    # sd_xl_base.yaml's values
    assert {k: p[k] for k in ("adm_in_channels", "model_channels", "attention_resolutions", "num_res_blocks",
                              "channel_mult", "num_head_channels", "use_linear_in_transformer", "context_dim")} == {
        "adm_in_channels": 2816, "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2,
        "channel_mult": [1, 2, 4], "num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 2048}
    assert p["transformer_depth"] == [1, 2, 10] and "num_heads" not in p
    # diffusers reads the image size from the keys: an SDXL base state dict (names only matter)
    state = {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1)}
    theirs = sfu.create_unet_diffusers_config_from_ldm(config, state)
    ours = unet_diffusers_config(unet.config, 128)
    assert theirs == plain({k: ours.get(k) for k in theirs})
    theirs_vae = sfu.create_vae_diffusers_config_from_ldm(config, state, image_size=1024)
    assert theirs_vae == plain({k: v for k, v in vae_diffusers_config(vae.config, 1024).items() if k in theirs_vae})


def plain(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def test_schedules_the_yaml_cannot_say_are_refused_before_writing(clips, tmp_path):
    for schedule, match in [(NoiseSchedule.make("cosine"), "scaled_linear"),
                            (NoiseSchedule.make("scaled_linear", prediction_type="sample"), "prediction_type")]:
        out = tmp_path / f"{schedule.kind}-{schedule.prediction_type}.safetensors"
        with pytest.raises(ExportError, match=match):
            export(tiny_sdxl(clips, schedule), "single-file", out, resolution=SIZE, allow_unloadable=True)
        assert not any(tmp_path.iterdir())
    v = NoiseSchedule.make("scaled_linear", prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    out = tmp_path / "v.safetensors"
    export(tiny_sdxl(clips, v), "single-file", out, resolution=SIZE, dtype="fp16", allow_unloadable=True)
    text = out.with_suffix(".yaml").read_text()
    assert "zero terminal SNR" in text.split("model:")[0]  # said in the comment
    denoiser = yaml.safe_load(text)["model"]["params"]["denoiser_config"]["params"]
    assert denoiser["scaling_config"]["target"] == "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"
    assert denoiser["weighting_config"]["target"] == "sgm.modules.diffusionmodules.denoiser_weighting.VWeighting"
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.label_emb.0.0.weight").dtype == torch.float16
        assert f.metadata()["ldm_dtype"] == "float16"


def test_sd_text_encoder_with_an_sdxl_unet_is_refused(clips, tmp_path):
    from ldm.models.text_encoder import CLIPTextEncoder

    bundle = tiny_sdxl(clips)
    bundle.text_encoder = CLIPTextEncoder.from_pretrained(clips)
    with pytest.raises(ExportError, match="adm_in_channels"):
        export(bundle, "single-file", tmp_path / "x.safetensors", resolution=SIZE)


def test_ldm_bundle_stores_both_text_encoders(clips, tmp_path):
    from ldm.formats.ldm_bundle import load_ldm_bundle_into

    bundle = tiny_sdxl(clips)
    bundle.meta = {}  # SDXL's VAE is kept in float32 without being told
    bundle.text_encoder.max_chunks = 2
    result = export(bundle, "ldm", tmp_path / "b", resolution=SIZE)
    assert {"text_encoder/", "tokenizer/", "text_encoder_2/", "tokenizer_2/"} <= set(result.written)
    back = load_bundle(tmp_path / "b", device="cpu", dtype="float16")
    assert isinstance(back.text_encoder, DualCLIPTextEncoder) and back.meta["vae_fp32"]
    assert back.text_encoder.max_chunks == 2 and back.text_encoder.zero_uncond
    assert next(back.autoencoder.parameters()).dtype == torch.float32  # SDXL's VAE stays float32
    back = load_bundle(tmp_path / "b", device="cpu", dtype="float32")
    assert back.unet.config == bundle.unet.config and back.meta["resolution"] == SIZE
    assert_same_networks(back, bundle)
    # into existing modules (model.pretrained=<bundle>): bigG too, strictly
    te = DualCLIPTextEncoder.from_pretrained(tmp_path / "b")
    randomize(te.model_2, 5)
    load_ldm_bundle_into(tmp_path / "b", UNet(**TINY_XL), None, te)
    assert all(torch.equal(v, te.model_2.state_dict()[k]) for k, v in bundle.text_encoder.model_2.state_dict().items())
    from ldm.formats.safe_load import CheckpointError
    from ldm.models.text_encoder import CLIPTextEncoder

    with pytest.raises(CheckpointError, match="dual SDXL text encoder"):
        load_ldm_bundle_into(tmp_path / "b", UNet(**TINY_XL), None, CLIPTextEncoder.from_pretrained(tmp_path / "b"))


def test_cli_exports_an_sdxl_folder_as_a_single_file(bundle, tmp_path, capsys):
    from ldm.cli.export import main

    write_diffusers(bundle, tmp_path / "folder", resolution=SIZE)
    out = tmp_path / "cli" / "xl.safetensors"
    assert main([str(tmp_path / "folder"), "--format", "single-file", "--out", str(out), "--dtype", "bf16",
                 "--allow-unloadable"]) == 0
    assert f"exported single-file (bf16) -> {out}" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("conditioner.embedders.1.model.text_projection").dtype == torch.bfloat16
    assert yaml.safe_load(out.with_suffix(".yaml").read_text())["model"]["params"]["network_config"]["params"][
        "adm_in_channels"] == TINY_XL["adm_in_channels"]
