"""Whole SD3 / SD3.5 weights, read and written: a tiny SD3 diffusers folder laid out like the real one (written by
diffusers' own StableDiffusion3Pipeline.save_pretrained) loads into our model and samples the pipeline's latents;
our export of it loads in diffusers unchanged with the same latents; the single file (ComfyUI's layout) reads back
exactly; bad configs are refused naming the key."""

import json

import pytest
import torch

from ldm.formats.detect import detect_source
from ldm.formats.load import load_bundle
from ldm.formats.safe_load import CheckpointError
from ldm.pipelines import text_to_image
from tests.helpers.models import perturbed
from tests.helpers.sd3 import pipeline_latents, tiny_sd3_pipeline, write_tiny_sd3_folder

pytestmark = pytest.mark.usefixtures("one_thread")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle", "a blue square"]


def our_latents(bundle, steps=3, scale=4.5, seed=7):
    seen = []
    text_to_image(bundle, PROMPTS, sampler="flow_euler", steps=steps, guidance_scale=scale, height=16, width=16,
                  seed=seed, callback=lambda i, t, x, x0: seen.append(x))
    return seen[-1]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(folder, pipeline) with a T5 (text_encoder_3/)."""
    return write_tiny_sd3_folder(tmp_path_factory.mktemp("sd3"), use_t5=True)


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory):
    return write_tiny_sd3_folder(tmp_path_factory.mktemp("sd3_no_t5"), use_t5=False)


@pytest.mark.parametrize("which", ["sd3", "sd3_no_t5"])
def test_sd3_folder_loads_and_samples_the_pipelines_latents(which, request):
    folder, pipe = request.getfixturevalue(which)
    assert detect_source(folder) == "sd3_diffusers"
    bundle = load_bundle(folder)
    assert (bundle.text_encoder.t5 is not None) == (which == "sd3")
    assert bundle.schedule.shift == 3.0 and bundle.meta["format"] == "sd3_diffusers"
    vae = bundle.autoencoder
    assert not any("quant_conv" in k for k in vae.state_dict()) and vae.shift_factor == 0.0609
    expected = pipeline_latents(pipe, PROMPTS)
    assert expected.abs().max() > 0.5  # a real signal
    torch.testing.assert_close(our_latents(bundle), expected, atol=1e-5, rtol=0)
    # SD3's VAE: latent = (z - shift) * scale and back, as diffusers' pipeline decodes
    with torch.no_grad():
        ours = vae.decode_latents(expected)
        theirs = pipe.vae.decode(expected / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["sd3", "sd3_no_t5"])
def test_export_loads_in_diffusers_unchanged_with_equal_latents(which, request, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from ldm.formats.exporter import export

    folder, _ = request.getfixturevalue(which)
    bundle = perturbed(load_bundle(folder))
    out = tmp_path / "export"
    result = export(bundle, "diffusers", out)
    assert "StableDiffusion3Pipeline.from_pretrained" in result.notes[0]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert (index["text_encoder_3"] == [None, None]) == (which == "sd3_no_t5")
    assert json.loads((out / "vae" / "config.json").read_text())["use_quant_conv"] is False
    # without a T5, diffusers' own saved folder needs the same two None arguments (its model_index is the same)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, **({} if which == "sd3" else dict(text_encoder_3=None,
                                                                                          tokenizer_3=None)))
    torch.testing.assert_close(our_latents(bundle), pipeline_latents(pipe, PROMPTS), atol=1e-5, rtol=0)
    # ... and it reads back into ours exactly
    again = load_bundle(out)
    for name in ("unet", "autoencoder", "text_encoder"):
        theirs = getattr(again, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(bundle, name).state_dict().items()), name


def test_single_file_round_trip_in_comfyuis_layout(sd3, tmp_path):
    from safetensors import safe_open

    from ldm.formats.exporter import export

    folder, _ = sd3
    bundle = perturbed(load_bundle(folder))
    path = tmp_path / "sd3.safetensors"
    result = export(bundle, "single-file", path, allow_unloadable=True)  # a tiny MMDiT: not ComfyUI's SD3 sizes
    assert result.paths == [path] and not path.with_suffix(".yaml").exists()
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    prefixes = {k.split(".transformer.")[0] + "." if k.startswith("text_encoders.") else k.split(".")[0] + "."
                for k in keys}
    assert prefixes == {"model.", "first_stage_model.", "text_encoders.clip_l.", "text_encoders.clip_g.",
                        "text_encoders.t5xxl."}
    # what ComfyUI's SD3 detection reads (supported_models.SD3.clip_target, model_detection)
    assert {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
            "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight",
            "text_encoders.clip_g.transformer.text_projection.weight",
            "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight",
            "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"} <= keys
    assert not any("quant_conv" in k for k in keys)
    assert detect_source(path) == "sd3_single_file"
    again = load_bundle(path, text_encoder=str(folder))  # the tokenizers (a file carries none) from the folder
    for name in ("unet", "autoencoder", "text_encoder"):
        theirs = getattr(again, name).state_dict()
        ours = getattr(bundle, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.items()), name
    assert again.schedule == bundle.schedule and again.unet.config == {**bundle.unet.config}
    torch.testing.assert_close(our_latents(again), our_latents(bundle), atol=0, rtol=0)


def test_single_file_without_our_header_infers_the_model_as_comfyui(sd3, tmp_path):
    """A file of another tool (no ldm_* header): the MMDiT from the shapes (64-wide heads) and shift 3.0. (The tiny
    VAE's 8 GroupNorm groups are not in the tensors, so its header entry is kept here; SD3's own VAE has 32.)"""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ldm.formats.exporter import export
    from ldm.models.mmdit import MMDiT

    folder, _ = sd3
    bundle = load_bundle(folder)
    bundle.unet = MMDiT(**{**bundle.unet.config, "attention_head_dim": 64, "num_attention_heads": 1})
    path = tmp_path / "ours.safetensors"
    export(bundle, "single-file", path, allow_unloadable=True)
    bare = tmp_path / "theirs.safetensors"
    with safe_open(str(path), framework="pt") as f:
        vae_header = f.metadata()["ldm_vae_config"]
    save_file(load_file(str(path)), str(bare), metadata={"ldm_vae_config": vae_header})  # no other header entry
    again = load_bundle(bare, text_encoder=str(folder))
    assert again.unet.config == {**bundle.unet.config, "sample_size": 128}  # SD3's base grid (not in the tensors)
    assert again.schedule.shift == 3.0
    assert all(torch.equal(v, again.unet.state_dict()[k]) for k, v in bundle.unet.state_dict().items())


def test_comfyui_check_knows_sd3s_sizes():
    from types import SimpleNamespace

    from transformers import CLIPTextConfig, T5Config

    from ldm.diffusion.flow import FlowMatching
    from ldm.formats.comfyui_check import CLIP_G, CLIP_L, T5_XXL, comfyui_check_bundle
    from ldm.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig
    from ldm.models.config_fields import record
    from ldm.models.mmdit import MMDIT_PRESETS, MMDiTConfig

    def bundle(preset="sd35_medium", shift=3.0, t5=True, **mmdit):
        unet = SimpleNamespace(joint_blocks=[], config=record(MMDiTConfig(**{**MMDIT_PRESETS[preset], **mmdit})))
        vae = SimpleNamespace(config=record(AutoencoderConfig(**AUTOENCODER_PRESETS["sd3"])))
        te = SimpleNamespace(model=SimpleNamespace(config=CLIPTextConfig(**CLIP_L)),
                             model_2=SimpleNamespace(config=CLIPTextConfig(**CLIP_G)), joint_dim=4096,
                             t5=SimpleNamespace(config=T5Config(**T5_XXL)) if t5 else None)
        return SimpleNamespace(unet=unet, autoencoder=vae, text_encoder=te, schedule=FlowMatching(shift=shift))

    for preset in ("sd3_medium", "sd35_medium", "sd35_large"):
        check = comfyui_check_bundle(bundle(preset))
        assert check.loadable and check.architecture == "SD3" and not check.notes, (preset, check)
    assert "ModelSamplingSD3" in comfyui_check_bundle(bundle(shift=1.0)).notes[0]
    assert "no T5" in comfyui_check_bundle(bundle(t5=False)).notes[0]
    wrong_heads = comfyui_check_bundle(bundle(attention_head_dim=32, num_attention_heads=48))
    assert not wrong_heads.loadable and "64-wide heads" in wrong_heads.problems[0]
    assert comfyui_check_bundle(bundle(in_channels=4, out_channels=4)).architecture is None
    projected = bundle()
    projected.text_encoder.model.text_projection = SimpleNamespace(weight=torch.eye(768))
    assert comfyui_check_bundle(projected).loadable  # SD3's CLIP-L: the identity (pooled unprojected)
    projected.text_encoder.model.text_projection.weight = torch.eye(768) * 2
    assert "text_projection is not the identity" in comfyui_check_bundle(projected).problems[0]


def test_bad_sd3_folders_are_refused_naming_the_key(sd3, tmp_path):
    import shutil

    folder, _ = sd3
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = bad / "scheduler" / "scheduler_config.json"
    good = json.loads(config.read_text())
    config.write_text(json.dumps({**good, "use_karras_sigmas": True}))
    with pytest.raises(CheckpointError, match="use_karras_sigmas"):
        load_bundle(bad)
    config.write_text(json.dumps({**good, "shift": 1e9}))
    with pytest.raises(CheckpointError, match="shift"):
        load_bundle(bad)
    config.write_text(json.dumps(good))
    t5 = bad / "text_encoder_3" / "config.json"
    t5.write_text(json.dumps({**json.loads(t5.read_text()), "d_model": 10**9}))
    with pytest.raises(CheckpointError, match="d_model"):
        load_bundle(bad)
    from ldm.models.text_encoder_sd3 import SD3TextEncoder

    with pytest.raises(ValueError, match="d_model = 1000000000"):  # the models layer bounds it as well (training)
        SD3TextEncoder.from_pretrained(bad, joint_dim=96)
    t5.write_text(json.dumps({**json.loads(t5.read_text()), "d_model": 128}))  # bounded, but not the weights'
    with pytest.raises(CheckpointError, match="shape"):
        load_bundle(bad)
    shutil.rmtree(bad / "text_encoder_3")
    shutil.rmtree(bad / "tokenizer_3")
    assert load_bundle(bad).text_encoder.t5 is None  # T5 optional (diffusers' text_encoder_3=None)


def test_pipeline_without_t5_and_our_zero_t5_agree_on_the_context(sd3_no_t5):
    """diffusers without text_encoder_3 puts zeros in the T5 tokens (max_sequence_length of them): so do we."""
    folder, pipe = sd3_no_t5
    te = load_bundle(folder).text_encoder
    ours = te(PROMPTS)
    theirs, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours["crossattn"], theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours["vector"], pooled, atol=1e-6, rtol=0)
    assert not ours["crossattn"][:, 77:].any()


def test_tiny_pipeline_helper_is_sensitive(tmp_path):
    """The comparisons above can fail: another shift in the folder gives other latents."""
    from ldm.formats.sd3_folder import load_sd3_diffusers

    pipe = tiny_sd3_pipeline(tmp_path, use_t5=False, shift=1.0)
    pipe.save_pretrained(tmp_path / "sd3")
    bundle = load_sd3_diffusers(tmp_path / "sd3")
    assert bundle.schedule.shift == 1.0
    other = load_sd3_diffusers(tmp_path / "sd3")
    other.schedule = type(other.schedule)(shift=3.0)
    assert (our_latents(bundle) - our_latents(other)).abs().max() > 1e-2


def test_sd3_vae_config_inferred_from_its_tensors():
    """A headerless file's VAE: SD3's (16 latent channels, no quant convs) from the shapes, its latent format
    ComfyUI's latent_formats.SD3 (counted on the meta device: no memory)."""
    from ldm.formats.sd3_single_file import _inferred_vae
    from ldm.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_preset("sd3")
    config = _inferred_vae(vae.state_dict(), "sd3.safetensors")
    expected = {k: v for k, v in vae.config.items() if k in config}
    assert config == {**expected, "channel_mult": list(vae.config["channel_mult"])}
    assert {k: config[k] for k in AUTOENCODER_PRESETS["sd3"]} == AUTOENCODER_PRESETS["sd3"]


def test_a_file_without_tokenizers_names_the_option(sd3, tmp_path):
    """An SD3 single file carries no tokenizers: without text_encoder= (and no SD3.5 in this machine's hub cache) the
    error says what to pass."""
    from ldm.formats.exporter import export

    folder, _ = sd3
    path = tmp_path / "sd3.safetensors"
    export(str(folder), "single-file", path, allow_unloadable=True)
    with pytest.raises(CheckpointError, match="text_encoder=<an SD3 diffusers folder>"):
        load_bundle(path)


def test_a_hub_id_of_an_sd3_repo_is_read_as_sd3(sd3, monkeypatch, tmp_path):
    """A hub id is a folder once its files are here (huggingface_hub's snapshot): an SD3 repo goes to the SD3
    loader, for sampling and for model.pretrained (the download is stood in for: no network in tests)."""
    import ldm.formats.sd3_folder as sd3_folder
    from ldm.formats.training_checkpoint import load_weights_into

    folder, _ = sd3
    monkeypatch.setattr(sd3_folder, "resolve_folder", lambda hub_id: folder)
    bundle = load_bundle("someone/tiny-sd3")
    assert bundle.meta["format"] == "sd3_diffusers" and bundle.source == "someone/tiny-sd3"
    import shutil

    shutil.copytree(folder, tmp_path / "elsewhere")  # text encoders built from another folder: filled from the repo
    fresh = load_bundle(tmp_path / "elsewhere")
    with torch.no_grad():
        for m in (fresh.unet, fresh.text_encoder):
            for p in m.parameters():
                p.zero_()
    assert load_weights_into("someone/tiny-sd3", fresh.unet, fresh.autoencoder, fresh.text_encoder) == "sd3_diffusers"
    for name in ("unet", "text_encoder"):
        theirs = getattr(fresh, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(bundle, name).state_dict().items()), name


# stabilityai/stable-diffusion-3-medium-diffusers vae/config.json (SD3.5's is the same)
SD3_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
           "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 2,
           "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 1.5305,
           "shift_factor": 0.0609, "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False,
           "use_quant_conv": False}


def test_the_sd3_vae_preset_is_sd3s_vae_in_diffusers():
    """autoencoder.preset=sd3 is the real SD3 VAE: its config read from diffusers' config.json, and its weights'
    names and shapes mapped onto diffusers' AutoencoderKL of that config (both on the meta device: no memory)."""
    from diffusers import AutoencoderKL as DiffusersVAE

    from ldm.formats.diffusers_keys import vae_config_from_diffusers, vae_ldm_to_diffusers
    from ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        ours = AutoencoderKL.from_preset("sd3")
        theirs = DiffusersVAE(**{k: v for k, v in SD3_VAE.items() if not k.startswith("_")})
        assert AutoencoderKL(**vae_config_from_diffusers(SD3_VAE)).config == ours.config
    mapped = {k: tuple(v.shape) for k, v in vae_ldm_to_diffusers(ours.state_dict(), ours.config).items()}
    assert mapped == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_single_file_header_lengths_are_bounded(sd3, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ldm.formats.exporter import export

    folder, _ = sd3
    path = tmp_path / "sd3.safetensors"
    export(str(folder), "single-file", path, allow_unloadable=True)
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    header["ldm_sd3_text"] = json.dumps({"max_length": 77, "joint_dim": 96, "t5_length": 10**9})
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata=header)
    with pytest.raises(CheckpointError, match="t5_length"):
        load_bundle(bad, text_encoder=str(folder))


def test_diffusers_reads_our_single_file_as_an_sd3_checkpoint(sd3, tmp_path):
    """diffusers' own single-file converter (StableDiffusion3Pipeline.from_single_file, the folder for its configs
    and tokenizers) reads our file's layout: the same latents within 1e-5. (diffusers leaves the T5 it builds
    in training mode, dropout on: it is put in eval mode here, as its from_pretrained does.)"""
    from diffusers import StableDiffusion3Pipeline

    from ldm.formats.exporter import export

    folder, _ = sd3
    bundle = perturbed(load_bundle(folder))
    with torch.no_grad():  # SD3 pools CLIP-L unprojected: diffusers' from_single_file sets its projection to eye
        bundle.text_encoder.model.text_projection.weight.copy_(torch.eye(32))
    path = tmp_path / "sd3.safetensors"
    export(bundle, "single-file", path, allow_unloadable=True)
    pipe = StableDiffusion3Pipeline.from_single_file(str(path), config=str(folder))
    pipe.text_encoder_3.eval()
    torch.testing.assert_close(our_latents(bundle), pipeline_latents(pipe, PROMPTS), atol=1e-5, rtol=0)
