"""Export (``python -m ldm.cli.export``): a tiny model trained here, written as a diffusers folder, an SD single file +
yaml and our bundle; diffusers (the reference) loads each and computes what we compute; every format reads back
to the same tensors; dtype, --no-frozen, overwrite and bad-input rules."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open

from ldm.formats.safe_load import CheckpointError
from ldm.diffusion.guidance import Conditioning
from ldm.diffusion.samplers import ddim, make_timesteps
from ldm.diffusion.schedules import NoiseSchedule
from ldm.formats.exporter import export
from ldm.formats.ldm_bundle import load_ldm_bundle, load_ldm_bundle_into
from ldm.formats.common import ExportError
from ldm.formats.diffusers_folder import diffusers_scheduler_config
from ldm.formats.single_file import original_config
from ldm.formats.training_checkpoint import load_training_checkpoint
from tests.helpers.models import randomize

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
CKPT = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"]
PROMPT = "a red circle"
RES = 16  # the tiny model's training resolution (VAE factor 2: 8x8 latents)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real training checkpoint: the tiny model trained 3 steps, with an EMA copy that differs from the U-Net."""
    from ldm.training.run.train import train
    from tests.helpers.training import TINY_MODEL, compose_train

    tmp = tmp_path_factory.mktemp("train")
    result = train(compose_train(tmp, TINY_MODEL + CKPT + ["module.ema_decay=0.9", f"data.val.resolution={RES}",
                                                           f"data.train.resolution={RES}"]))
    return Path(result["last_checkpoint"])


@pytest.fixture(scope="module")
def ours(ckpt):
    return load_training_checkpoint(ckpt)  # EMA weights


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def diffusers_dir(ckpt, out):
    export(ckpt, "diffusers", out / "diffusers")
    return out / "diffusers"


@pytest.fixture(scope="module")
def single_file(ckpt, out):
    export(ckpt, "single-file", out / "model.safetensors", allow_unloadable=True)  # a tiny model: not ComfyUI's
    return out / "model.safetensors"


def state(module) -> dict:
    module = getattr(module, "model", module)  # CLIPTextEncoder -> its CLIPTextModel
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def assert_same_tensors(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def heads(unet) -> list:
    """The head count of every attention layer."""
    return [m.num_heads for m in unet.modules() if hasattr(m, "num_heads") and hasattr(m, "to_q")]


def assert_same_bundle(a, b, same_head_settings=True):
    """Every tensor equal (dtype too), the same schedule and the same architecture."""
    assert_same_tensors(a.unet, b.unet)
    assert_same_tensors(a.autoencoder, b.autoencoder)
    assert_same_tensors(a.text_encoder, b.text_encoder)
    assert torch.equal(a.schedule.betas, b.schedule.betas)
    assert a.schedule.prediction_type == b.schedule.prediction_type
    skip = {"gradient_checkpointing"} | (set() if same_head_settings else {"num_heads", "num_head_channels"})
    assert {k: v for k, v in a.unet.config.items() if k not in skip} == {
        k: v for k, v in b.unet.config.items() if k not in skip}
    assert heads(a.unet) and heads(a.unet) == heads(b.unet)
    assert a.autoencoder.config == b.autoencoder.config


def safetensors_dtypes(path) -> set:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def our_ddim_image(bundle, latents, steps, guidance, spacing):
    """SD's DDIM settings (what the exported scheduler config says): offset 1, last step to abar_0."""
    te = bundle.text_encoder
    with torch.no_grad():
        cond = Conditioning(te([PROMPT]), te([""]))
        ts = make_timesteps(bundle.schedule, steps, spacing, steps_offset=1 if spacing == "leading" else 0)
        z = ddim(bundle.unet, latents, bundle.schedule, ts, cond=cond, guidance_scale=guidance, final_alpha_one=False)
        return bundle.autoencoder.decode_latents(z).clamp(-1, 1)


def diffusers_image(pipe, latents, steps, guidance):
    images = pipe(PROMPT, negative_prompt="", guidance_scale=guidance, num_inference_steps=steps, height=RES,
                  width=RES, latents=latents, output_type="pt").images
    return images * 2 - 1  # [0, 1] -> our [-1, 1]


def start_latents():
    return torch.randn((1, 4, RES // 2, RES // 2), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------------------------
# diffusers and single file: the reference library loads them and computes what we compute


SCHEDULES = {
    "eps-leading": (NoiseSchedule.make("scaled_linear"), "leading"),
    "v-zero-snr-trailing": (NoiseSchedule.make("scaled_linear", rescale_zero_terminal_snr=True,
                                               prediction_type="v_prediction"), "trailing"),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_diffusers_pipeline_makes_our_image(ours, out, name):
    schedule, spacing = SCHEDULES[name]
    bundle = dataclasses.replace(ours, schedule=schedule)
    folder = out / f"diffusers-{name}"
    export(bundle, "diffusers", folder, resolution=RES)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.timestep_spacing == spacing
    assert pipe.unet.config.sample_size == RES // 2
    latents = start_latents()
    ref = diffusers_image(pipe, latents, steps=5, guidance=3.0)
    mine = our_ddim_image(bundle, latents, steps=5, guidance=3.0, spacing=spacing)
    assert mine.std() > 0.05  # a real image, not a constant
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)


def test_diffusers_export_of_the_checkpoint(ckpt, ours, diffusers_dir):
    index = json.loads((diffusers_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert sorted(p.name for p in diffusers_dir.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                               "tokenizer", "unet", "vae"]
    sched = json.loads((diffusers_dir / "scheduler" / "scheduler_config.json").read_text())
    expected = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
                "rescale_betas_zero_snr": False}
    assert {k: sched.get(k) for k in expected} == expected
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None, local_files_only=True)
    latents = start_latents()
    torch.testing.assert_close(our_ddim_image(ours, latents, 4, 4.0, "leading"),
                               diffusers_image(pipe, latents, 4, 4.0), atol=1e-4, rtol=0)


def test_single_file_loads_in_diffusers(ours, single_file, diffusers_dir):
    yaml_path = single_file.with_suffix(".yaml")
    assert yaml_path.is_file()
    unet = diffusers.UNet2DConditionModel.from_single_file(str(single_file), original_config=str(yaml_path),
                                                           local_files_only=True).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        context = ours.text_encoder([PROMPT, "a blue square"])
        torch.testing.assert_close(unet(x, 10, context).sample, ours.unet(x, 10, context), atol=1e-5, rtol=1e-5)
    # the whole pipeline: U-Net and VAE configs from our yaml, weights (text encoder too) from the file; the
    # tokenizer and CLIP config from a local diffusers folder (single files carry none)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(single_file), original_config=str(yaml_path), config=str(diffusers_dir), local_files_only=True,
        safety_checker=None)
    latents = start_latents()
    torch.testing.assert_close(our_ddim_image(ours, latents, 4, 3.0, "leading"),
                               diffusers_image(pipe, latents, 4, 3.0), atol=1e-4, rtol=0)


def test_scheduler_config_reproduces_every_schedule():
    for schedule in (NoiseSchedule.make("linear"), NoiseSchedule.make("scaled_linear"), NoiseSchedule.make("cosine"),
                     NoiseSchedule.make("scaled_linear", 500, 0.001, 0.02, prediction_type="v_prediction"),
                     NoiseSchedule.make("linear", rescale_zero_terminal_snr=True, prediction_type="sample")):
        cfg = diffusers_scheduler_config(schedule)
        classes = [diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler, diffusers.DPMSolverMultistepScheduler]
        if not schedule.zero_terminal_snr:  # PNDM has no zero-terminal-SNR rescale
            classes.append(diffusers.PNDMScheduler)
        for cls in classes:
            sched = cls.from_config(cfg)
            assert sched.config.prediction_type == schedule.prediction_type
            # diffusers keeps a float32 cumprod (~1e-7 off our float64 one)
            torch.testing.assert_close(sched.alphas_cumprod.double(), schedule.alphas_cumprod, atol=1e-6, rtol=0)
    with pytest.raises(ExportError, match="custom"):
        diffusers_scheduler_config(NoiseSchedule(torch.linspace(1e-4, 0.02, 10)))


def test_original_config_of_sd_presets_reads_like_the_official_one():
    """v1-inference.yaml / v2-inference-v.yaml values, and diffusers derives our U-Net / VAE configs from them."""
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    from ldm.formats.diffusers_keys import unet_diffusers_config, vae_diffusers_config
    from ldm.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL
    from ldm.models.unet import UNET_PRESETS, UNet

    with torch.device("meta"):
        vae_cfg = AutoencoderKL(**AUTOENCODER_PRESETS["sd"]).config
        configs = {name: UNet(**UNET_PRESETS[name]).config for name in ("sd15", "sd21", "tiny")}
    sd15 = original_config(configs["sd15"], vae_cfg, NoiseSchedule.make("scaled_linear"))["model"]["params"]
    assert (sd15["linear_start"], sd15["linear_end"], sd15["timesteps"], sd15["scale_factor"]) == (
        0.00085, 0.012, 1000, 0.18215)
    assert "parameterization" not in sd15 and "beta_schedule" not in sd15
    u = sd15["unet_config"]["params"]
    assert (u["attention_resolutions"], u["channel_mult"], u["num_heads"], u["context_dim"], u["image_size"]) == (
        [4, 2, 1], [1, 2, 4, 4], 8, 768, 64)
    assert "use_linear_in_transformer" not in u and "num_head_channels" not in u
    dd = sd15["first_stage_config"]["params"]["ddconfig"]
    assert (dd["ch"], dd["ch_mult"], dd["z_channels"], dd["num_res_blocks"]) == (128, [1, 2, 4, 4], 4, 2)
    assert sd15["cond_stage_config"]["target"].endswith("FrozenCLIPEmbedder")

    v_schedule = NoiseSchedule.make("scaled_linear", prediction_type="v_prediction")
    sd21 = original_config(configs["sd21"], vae_cfg, v_schedule, text_layout="sd2", resolution=768)["model"]["params"]
    u = sd21["unet_config"]["params"]
    assert sd21["parameterization"] == "v" and u["image_size"] == 96 and u["context_dim"] == 1024
    assert (u["num_head_channels"], u["use_linear_in_transformer"]) == (64, True) and "num_heads" not in u
    assert sd21["cond_stage_config"] == {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                         "params": {"freeze": True, "layer": "penultimate"}}
    assert original_config(configs["sd15"], vae_cfg, NoiseSchedule.make("linear"))["model"]["params"][
        "beta_schedule"] == "sqrt_linear"  # the original code's name for betas linear in beta

    keys = ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
            "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
            "transformer_layers_per_block")
    for name, unet_cfg in configs.items():
        orig = original_config(unet_cfg, vae_cfg, NoiseSchedule.make("scaled_linear"))
        theirs = create_unet_diffusers_config_from_ldm(orig, {})
        mine = unet_diffusers_config(unet_cfg)
        assert {k: theirs[k] for k in keys} == {k: mine[k] for k in keys}, name
    theirs = create_vae_diffusers_config_from_ldm(original_config(configs["sd15"], vae_cfg,
                                                                  NoiseSchedule.make("scaled_linear")), {})
    mine = vae_diffusers_config(vae_cfg)
    assert {k: theirs[k] for k in mine if k != "_class_name" and k in theirs} == {
        k: mine[k] for k in mine if k != "_class_name" and k in theirs}


def sd2_style(ours, tmp_path):
    """Our tiny model made SD2-like: linear transformer projections, an OpenCLIP-style (gelu) text encoder
    conditioned on its penultimate layer, v-prediction."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.models import tiny_clip
    from ldm.models.text_encoder import CLIPTextEncoder
    from ldm.models.unet import UNet

    vocab = tiny_clip.write_tokenizer(tmp_path / "tok")
    config = tiny_clip.tiny_clip_config(len(vocab), vocab[tiny_clip.BOS], vocab[tiny_clip.EOS], num_layers=3)
    config.hidden_act = "gelu"
    te = CLIPTextEncoder(randomize(CLIPTextModel(config), 3), CLIPTokenizer.from_pretrained(tmp_path / "tok"),
                         penultimate=True)
    unet = randomize(UNet(**{**ours.unet.config, "use_linear_projection": True}), 4).eval()
    schedule = NoiseSchedule.make("scaled_linear", prediction_type="v_prediction")
    return dataclasses.replace(ours, unet=unet, text_encoder=te, schedule=schedule, meta={"resolution": RES})


def test_sd2_style_model(ours, tmp_path):
    import yaml
    from transformers import CLIPTextModel

    from ldm.formats.load import load_bundle
    from ldm.models.text_encoder import CLIPTextEncoder

    bundle = sd2_style(ours, tmp_path)
    export(bundle, "diffusers", tmp_path / "d")
    # diffusers' SD2 folders keep 23 of OpenCLIP's 24 blocks: last_hidden_state is then our penultimate context
    clip = CLIPTextModel.from_pretrained(tmp_path / "d" / "text_encoder")
    assert clip.config.num_hidden_layers == 2
    ids = bundle.text_encoder.tokenize([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(clip(ids).last_hidden_state, bundle.text_encoder.encode_ids(ids))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "d", safety_checker=None)
    latents = start_latents()
    torch.testing.assert_close(our_ddim_image(bundle, latents, 4, 3.0, "leading"),
                               diffusers_image(pipe, latents, 4, 3.0), atol=1e-4, rtol=0)

    sf = tmp_path / "sd2.safetensors"
    export(bundle, "single-file", sf, allow_unloadable=True)
    params = yaml.safe_load(sf.with_suffix(".yaml").read_text())["model"]["params"]
    assert params["parameterization"] == "v"
    assert params["unet_config"]["params"]["use_linear_in_transformer"] is True
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"
    unet = diffusers.UNet2DConditionModel.from_single_file(str(sf), original_config=str(sf.with_suffix(".yaml")),
                                                           local_files_only=True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        context = bundle.text_encoder([PROMPT])
        torch.testing.assert_close(unet(x, 500, context).sample, bundle.unet(x, 500, context), atol=1e-5, rtol=1e-5)
    with safe_open(str(sf), "pt") as f:
        file = {k: f.get_tensor(k) for k in f.keys()}
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in file  # all 3 OpenCLIP blocks
    # diffusers reads the OpenCLIP text tower into its 2-layer (SD2-style) text encoder: the same images
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(sf), original_config=str(sf.with_suffix(".yaml")), config=str(tmp_path / "d"), local_files_only=True,
        safety_checker=None)
    torch.testing.assert_close(our_ddim_image(bundle, latents, 4, 3.0, "leading"),
                               diffusers_image(pipe, latents, 4, 3.0), atol=1e-4, rtol=0)
    fresh = CLIPTextEncoder(CLIPTextModel(bundle.text_encoder.model.config), bundle.text_encoder.tokenizer,
                            penultimate=True)
    assert_same_bundle(load_bundle(sf, text_encoder=fresh), bundle)


def test_pixel_space_model(ours, tmp_path):
    from ldm.models.autoencoder import IdentityAutoencoder
    from ldm.models.unet import UNet

    unet = randomize(UNet(**{**ours.unet.config, "in_channels": 3, "out_channels": 3}), 1)
    bundle = dataclasses.replace(ours, unet=unet, autoencoder=IdentityAutoencoder(), meta={"resolution": 8})
    for fmt, target in (("diffusers", tmp_path / "d"), ("single-file", tmp_path / "s.safetensors")):
        with pytest.raises(ExportError, match="pixel-space"):
            export(bundle, fmt, target)
    assert list(tmp_path.iterdir()) == []
    export(bundle, "ldm", tmp_path / "b")
    back = load_ldm_bundle(tmp_path / "b")
    assert isinstance(back.autoencoder, IdentityAutoencoder) and back.meta["resolution"] == 8
    assert_same_bundle(back, bundle)


# --------------------------------------------------------------------------------------------------------------
# round trips: every tensor back exactly


def test_round_trip_through_diffusers(ours, diffusers_dir):
    from ldm.formats.load import load_bundle

    back = load_bundle(diffusers_dir)
    # diffusers records head counts per level: 2 heads of 32 channels come back as num_heads=2
    assert_same_bundle(back, ours, same_head_settings=False)
    assert back.meta["resolution"] == RES


def test_round_trip_through_single_file(ours, single_file, tmp_path):
    from ldm.formats.load import load_bundle
    from ldm.models.text_encoder import CLIPTextEncoder

    other_te = CLIPTextEncoder.from_tiny(folder=tmp_path / "clip", seed=5)  # other weights: the file's must win
    key = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(other_te.hub_state_dict()[key], ours.text_encoder.hub_state_dict()[key])
    back = load_bundle(single_file, text_encoder=other_te)
    assert_same_bundle(back, ours)
    assert back.meta["resolution"] == RES
    with safe_open(str(single_file), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)


def test_round_trip_through_ldm_bundle_cli(ckpt, ours, tmp_path):
    """The real command line, in a subprocess."""
    folder = tmp_path / "bundle"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "ldm.cli.export", str(ckpt), "--format", "ldm", "--out", str(folder)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "U-Net weights: EMA" in run.stdout and str(folder) in run.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["ldm_bundle.json", "model.safetensors", "text_encoder",
                                                        "tokenizer"]
    back = load_ldm_bundle(folder)
    assert_same_bundle(back, ours)
    assert back.meta["resolution"] == RES and back.meta["ema"] is True
    with torch.no_grad():
        torch.testing.assert_close(back.text_encoder([PROMPT]), ours.text_encoder([PROMPT]), atol=0, rtol=0)

    from ldm.formats.load import load_bundle  # what sample.py uses

    assert_same_bundle(load_bundle(folder), ours)
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_raw_unet_and_load_into_existing_modules(ckpt, out):
    raw = load_training_checkpoint(ckpt, use_ema=False)
    folder = out / "raw-bundle"
    result = export(ckpt, "ldm", folder, raw=True)
    assert result.unet_weights.startswith("raw")
    fresh = load_training_checkpoint(ckpt)  # EMA weights: must be replaced by the raw ones
    assert not all(torch.equal(a, b) for a, b in zip(state(fresh.unet).values(), state(raw.unet).values()))
    with torch.no_grad():
        for p in [*fresh.autoencoder.parameters(), *fresh.text_encoder.parameters()]:
            p.add_(1.0)
    info = load_ldm_bundle_into(folder, fresh.unet, fresh.autoencoder, fresh.text_encoder)
    assert info["loaded"] == ["unet", "autoencoder", "text_encoder"] and info["resolution"] == RES
    assert torch.equal(info["schedule"].betas, raw.schedule.betas)
    assert_same_bundle(fresh, raw)


# --------------------------------------------------------------------------------------------------------------
# options: dtype, --no-frozen


def test_fp16_and_bf16(ckpt, ours, out):
    export(ckpt, "diffusers", out / "fp16", dtype="fp16")
    for sub in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        assert safetensors_dtypes(out / "fp16" / f"{sub}.safetensors") == {"F16"}, sub
    export(ckpt, "single-file", out / "fp16.safetensors", dtype="fp16", allow_unloadable=True)
    assert safetensors_dtypes(out / "fp16.safetensors") == {"F16"}
    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "fp16", subfolder="unet", torch_dtype=torch.float16)
    assert unet.dtype == torch.float16

    export(ckpt, "ldm", out / "bf16", dtype="bf16")
    back = load_ldm_bundle(out / "bf16")
    for module, theirs in ((back.unet, ours.unet), (back.autoencoder, ours.autoencoder),
                           (back.text_encoder, ours.text_encoder)):
        mine, ref = state(module), state(theirs)
        assert all(v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)) for k, v in mine.items()
                   if ref[k].is_floating_point())
    assert next(ours.unet.parameters()).dtype == torch.float32  # the source bundle is not touched


def test_no_frozen(ckpt, ours, out):
    r = export(ckpt, "diffusers", out / "unet-only", frozen=False)
    assert sorted(p.name for p in (out / "unet-only").iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert any("--no-frozen" in n for n in r.notes)
    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet-only", subfolder="unet")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(  # the frozen parts passed in
        out / "unet-only", vae=diffusers.AutoencoderKL.from_pretrained(out / "diffusers", subfolder="vae"),
        text_encoder=ours.text_encoder.model, tokenizer=ours.text_encoder.tokenizer, safety_checker=None)
    assert pipe.unet.config.block_out_channels == unet.config.block_out_channels

    export(ckpt, "single-file", out / "unet-only.safetensors", frozen=False, allow_unloadable=True)
    with safe_open(str(out / "unet-only.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("model.diffusion_model.") for k in keys)
    assert len(keys) == len(ours.unet.state_dict())
    assert (out / "unet-only.yaml").is_file()

    folder = out / "unet-only-bundle"
    export(ckpt, "ldm", folder, frozen=False)
    assert sorted(p.name for p in folder.iterdir()) == ["ldm_bundle.json", "model.safetensors"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
    with pytest.raises(CheckpointError, match="no-frozen"):
        load_ldm_bundle(folder)
    fresh = load_training_checkpoint(ckpt, use_ema=False)
    with pytest.raises(CheckpointError, match="autoencoder"):
        load_ldm_bundle_into(folder, fresh.unet, fresh.autoencoder)
    assert load_ldm_bundle_into(folder, fresh.unet)["loaded"] == ["unet"]
    assert_same_tensors(fresh.unet, ours.unet)


# --------------------------------------------------------------------------------------------------------------
# overwrite, bad input, safety


def test_overwrite_needs_force(ckpt, tmp_path, capsys):
    from ldm.cli import export_main

    target = tmp_path / "model"
    target.mkdir()
    (target / "ldm_bundle.json").write_text("{}")
    assert export_main([str(ckpt), "--format", "ldm", "--out", str(target)]) != 0
    assert "--force" in capsys.readouterr().err
    assert (target / "ldm_bundle.json").read_text() == "{}"  # untouched
    assert export_main([str(ckpt), "--format", "ldm", "--out", str(target), "--force"]) == 0
    assert json.loads((target / "ldm_bundle.json").read_text())["format"] == "ldm_bundle"

    file = tmp_path / "m.safetensors"
    file.write_bytes(b"old")
    assert export_main([str(ckpt), "--format", "single-file", "--out", str(file), "--allow-unloadable"]) != 0
    assert file.read_bytes() == b"old" and not file.with_suffix(".yaml").exists()
    assert export_main([str(ckpt), "--format", "single-file", "--out", str(file), "--force",
                        "--allow-unloadable"]) == 0
    assert file.with_suffix(".yaml").is_file() and file.stat().st_size > 1000

    foreign = tmp_path / "photos"  # --force never deletes a folder that is not an export
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    assert export_main([str(ckpt), "--format", "diffusers", "--out", str(foreign), "--force"]) != 0
    assert "no export wrote" in capsys.readouterr().err
    assert (foreign / "cat.jpg").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.yaml", "model", "photos"]


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_bad_checkpoint_writes_nothing(tmp_path, capsys, content):
    from ldm.cli import export_main

    bad = tmp_path / "bad.ckpt"
    if content is not None:
        bad.write_bytes(content)
    dest = tmp_path / "exports" / "x"
    for fmt in ("diffusers", "ldm"):
        assert export_main([str(bad), "--format", fmt, "--out", str(dest)]) == 1
        assert "error:" in capsys.readouterr().err
    assert export_main([str(bad), "--format", "single-file", "--out", str(tmp_path / "y.safetensors")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == (["bad.ckpt"] if content is not None else [])


def test_truncated_checkpoint_refused(ckpt, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(ExportError, match="cut.ckpt"):
        export(cut, "ldm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_requests(ours, tmp_path):
    with pytest.raises(ExportError, match=".safetensors"):
        export(ours, "single-file", tmp_path / "model.ckpt")
    with pytest.raises(ExportError, match="format"):
        export(ours, "onnx", tmp_path / "x")
    with pytest.raises(ExportError, match="multiple of"):
        export(ours, "ldm", tmp_path / "x", resolution=15)
    shifted = dataclasses.replace(ours, autoencoder=type(ours.autoencoder)(**{**ours.autoencoder.config,
                                                                              "shift_factor": 0.1}))
    with pytest.raises(ExportError, match="shift_factor"):
        export(shifted, "single-file", tmp_path / "s.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(ours, tmp_path, monkeypatch):
    import ldm.formats.exporter as core

    def half_then_fail(bundle, folder, **kwargs):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(core, "write_diffusers", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export(ours, "diffusers", tmp_path / "new" / "deeper" / "d")
    assert list(tmp_path.iterdir()) == []  # no temporary folder, and the parents it made are gone again


def test_bundle_never_imports_what_the_file_names(ckpt, tmp_path):
    folder = tmp_path / "b"
    export(ckpt, "ldm", folder)
    config = json.loads((folder / "ldm_bundle.json").read_text())
    config["model"]["unet"]["_target_"] = "os.system"
    (folder / "ldm_bundle.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="os.system"):
        load_ldm_bundle(folder)
    config["version"] = 99
    (folder / "ldm_bundle.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="version"):
        load_ldm_bundle(folder)


def test_console_scripts(monkeypatch, capsys):
    """ldm-train / ldm-sample run the repo's Hydra entry points (here: print the composed config only)."""
    from ldm import cli

    for main, expect in ((cli.train_main, "stage: diffusion"), (cli.sample_main, "guidance_scale:")):
        monkeypatch.setattr(sys, "argv", ["ldm-x", "--cfg", "job"])
        try:
            main()
        except SystemExit as exit_:  # hydra may exit after printing
            assert not exit_.code
        assert expect in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.export_main(["--help"])
    assert "--no-frozen" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# fine-tuning from an SD 1.5-layout single file (full size: slow)


class CheckLoaded(L.Callback):
    """At the start of training the networks hold the single file's weights (one tensor of each)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, module):
        with safe_open(self.path, "pt") as f:
            for key, net, name in (("model.diffusion_model.input_blocks.4.1.proj_in.weight", module.unet,
                                    "input_blocks.4.1.proj_in.weight"),
                                   ("first_stage_model.decoder.up.1.block.0.conv1.weight", module.autoencoder,
                                    "decoder.up.1.block.0.conv1.weight"),
                                   ("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight",
                                    module.text_encoder.model, "encoder.layers.11.mlp.fc1.weight")):
                own = dict(net.named_parameters())
                own = own.get(name, own.get("text_model." + name))
                assert torch.equal(own.detach(), f.get_tensor(key).float()), key
        Path(self.path).with_suffix(".checked").touch()  # the test sees that this ran


@pytest.mark.slow
def test_sd15_single_file_fine_tunes(tmp_path):
    """An SD-1.5-shaped single file (random fp16 weights) loads with model=sd15 model.pretrained=<file> and trains
    a step; the text encoder's tokenizer / config come from a local ViT-L/14-shaped CLIP folder."""
    import gc

    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from ldm.formats.single_file import to_single_file
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.text_encoder import CLIPTextEncoder, clip_text_config
    from ldm.models.tiny_clip import write_tokenizer
    from ldm.models.unet import UNet
    from ldm.training.run.train import train
    from tests.helpers.training import compose_train

    clip = tmp_path / "clip-vit-l14"
    write_tokenizer(clip)
    with torch.device("meta"):
        shapes = to_single_file(UNet.from_preset("sd15"), AutoencoderKL.from_preset("sd"),
                                CLIPTextEncoder(CLIPTextModel(clip_text_config("sd15")), None))
    g = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(v.shape, generator=g) * 0.02).half() for k, v in shapes.items()}
    path = tmp_path / "sd15.safetensors"
    save_file(weights, str(path))
    del weights, shapes
    gc.collect()
    CLIPTextModel(clip_text_config("sd15")).save_pretrained(clip)  # config + (other) weights, as a hub folder

    cfg = compose_train(tmp_path, [
        "model=sd15", f"model.pretrained={path}", f"model.text_encoder.path_or_hub_id={clip}",
        "data.batch_size=1", "data.train.resolution=64", "data.val.resolution=64", "data.train.size=4",
        "trainer.max_steps=1", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "lr_scheduler.warmup_steps=1", "module.ema_decay=null",
        "optim._target_=torch.optim.SGD", "~optim.betas", "optim.weight_decay=0", "callbacks=none",
        "+callbacks.check._target_=tests.formats.test_export.CheckLoaded", f"+callbacks.check.path={path}"])
    result = train(cfg)
    assert result["global_step"] == 1
    assert path.with_suffix(".checked").is_file()
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))


def test_single_file_refuses_a_vae_whose_groupnorm_is_not_32(tmp_path):
    """SD's yaml cannot say norm_groups: from_single_file would build GroupNorm(32) and decode a wrong image."""
    from ldm.diffusion.schedules import NoiseSchedule
    from ldm.models.bundle import ModelBundle
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.text_encoder import CLIPTextEncoder
    from ldm.models.unet import UNet

    unet = UNet(model_channels=32, channel_mult=[1, 1], attention_levels=[1], num_heads=-1, num_head_channels=32,
                context_dim=32)
    vae = AutoencoderKL.from_preset("tiny", norm_groups=8)
    text = CLIPTextEncoder.from_tiny("tiny", folder=tmp_path / "clip")
    bundle = ModelBundle(unet, vae, text, NoiseSchedule.make("scaled_linear"))
    with pytest.raises(ExportError, match="GroupNorm with 8 groups.*--format diffusers"):
        export(bundle, "single-file", tmp_path / "out" / "m.safetensors", resolution=RES)
    assert not (tmp_path / "out").exists()
    export(bundle, "diffusers", tmp_path / "pipe", resolution=RES)  # the format that can describe it
    assert json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())["norm_num_groups"] == 8
    export(dataclasses.replace(bundle, autoencoder=AutoencoderKL.from_preset("tiny")), "single-file",
           tmp_path / "ok.safetensors", resolution=RES, allow_unloadable=True)
