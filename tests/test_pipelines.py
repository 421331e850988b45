"""Pipelines (text-to-image, image-to-image, inpainting, guidance) and load_bundle, on tiny random models."""

import pytest
import torch

from ldm.models.bundle import ModelBundle
from ldm.formats.diffusers_folder import save_diffusers_folder
from ldm.formats.single_file import _ema_key, to_single_file
from ldm.diffusion.guidance import Conditioning
from ldm.diffusion.samplers import ddim, make_timesteps
from ldm.diffusion.schedules import NoiseSchedule
from ldm.formats.detect import detect_source
from ldm.formats.load import load_bundle
from ldm.formats.single_file import infer_unet_config, infer_vae_config, save_single_file
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.unet import UNet
from ldm.pipelines import image_to_image, inpaint, text_to_image
from ldm.pipelines.inpaint import KeepKnownRegion
from tests.helpers.models import bundle, clip_folder, randomize, tiny_bundle  # noqa: F401 - fixtures

SAMPLERS = ["ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m"]
PROMPTS = ["a red circle", "a blue square"]


pytestmark = pytest.mark.usefixtures("one_thread")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(5)
    return torch.rand(1, 3, 16, 16, generator=g) * 2 - 1


def square_mask(lo=4, hi=12, size=16):
    mask = torch.zeros(1, 1, size, size)
    mask[..., lo:hi, lo:hi] = 1
    return mask


def count_unet_calls(unet):
    """Batch size of every U-Net call, and the hook handle."""
    calls = []
    return calls, unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))


# ---------------------------------------------------------------------------------------------------------------
# text-to-image, classifier-free guidance


def test_text_to_image_shape_range_and_seed(bundle):
    a = text_to_image(bundle, PROMPTS, num_images_per_prompt=2, steps=3, height=16, width=24, seed=0)
    assert a.shape == (4, 3, 16, 24) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, text_to_image(bundle, PROMPTS, num_images_per_prompt=2, steps=3, height=16, width=24, seed=0))
    assert not torch.equal(a, text_to_image(bundle, PROMPTS, num_images_per_prompt=2, steps=3, height=16, width=24,
                                            seed=1))


def test_guidance_scale_one_is_the_plain_conditional_prediction(bundle):
    """w = 1: one U-Net call of batch B per step, and exactly the manual loop over the conditional model."""
    calls, hook = count_unet_calls(bundle.unet)
    try:
        out = text_to_image(bundle, PROMPTS, steps=4, guidance_scale=1.0, height=16, width=16, seed=3)
        assert calls == [2] * 4
        calls.clear()
        text_to_image(bundle, PROMPTS, steps=4, guidance_scale=7.5, height=16, width=16, seed=3)
        assert calls == [4] * 4  # CFG: uncond + cond in one doubled batch
    finally:
        hook.remove()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        cond = Conditioning(bundle.text_encoder(PROMPTS), None)
        z = ddim(bundle.unet, x, bundle.schedule, make_timesteps(bundle.schedule, 4), cond=cond)
        manual = bundle.autoencoder.decode_latents(z).clamp(-1, 1)
    torch.testing.assert_close(out, manual, rtol=0, atol=1e-6)


def test_negative_prompt_changes_the_result(bundle):
    kw = dict(steps=3, guidance_scale=5.0, height=16, width=16, seed=0)
    plain = text_to_image(bundle, PROMPTS, **kw)
    empty = text_to_image(bundle, PROMPTS, negative_prompt="", **kw)
    negative = text_to_image(bundle, PROMPTS, negative_prompt="green triangle", **kw)
    per_prompt = text_to_image(bundle, PROMPTS, negative_prompt=["green triangle", "green triangle"], **kw)
    torch.testing.assert_close(plain, empty)  # no negative prompt = the empty prompt
    assert (negative - plain).abs().mean() > 1e-3
    torch.testing.assert_close(per_prompt, negative)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_with_its_options(bundle, sampler):
    karras = sampler in ("euler", "euler_ancestral", "dpmpp_2m")
    eta = 0.5 if sampler == "ddim" else 0.0
    out = text_to_image(bundle, PROMPTS[0], sampler=sampler, steps=3, height=16, width=16, seed=0, eta=eta,
                        karras=karras, spacing="trailing")
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_bad_arguments_are_clear_errors(bundle, image):
    kw = dict(steps=2, seed=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        text_to_image(bundle, "a", height=18, width=16, **kw)
    with pytest.raises(ValueError, match="eta=0.5 only applies"):
        text_to_image(bundle, "a", height=16, width=16, sampler="euler", eta=0.5, **kw)
    with pytest.raises(ValueError, match="karras=True only applies"):
        text_to_image(bundle, "a", height=16, width=16, sampler="ddim", karras=True, **kw)
    with pytest.raises(ValueError, match="unknown sampler"):
        text_to_image(bundle, "a", height=16, width=16, sampler="heun", **kw)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        image_to_image(bundle, image, "a", strength=1.5, **kw)
    with pytest.raises(ValueError, match="mask size"):
        inpaint(bundle, image, torch.ones(1, 1, 8, 8), "a", **kw)


# ---------------------------------------------------------------------------------------------------------------
# image-to-image


def test_img2img_strength_zero_is_the_vae_round_trip(bundle, image):
    calls, hook = count_unet_calls(bundle.unet)
    try:
        out = image_to_image(bundle, image, "a red circle", strength=0.0, steps=10, seed=0)
    finally:
        hook.remove()
    assert calls == []
    with torch.no_grad():
        round_trip = bundle.autoencoder.decode_latents(bundle.autoencoder.encode_latents(image, sample=False))
    assert torch.equal(out, round_trip.clamp(-1, 1))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler_ancestral"])
def test_img2img_strength_one_is_text_to_image(bundle, image, sampler):
    kw = dict(sampler=sampler, steps=4, seed=7, guidance_scale=3.0)
    t2i = text_to_image(bundle, PROMPTS, height=16, width=16, **kw)
    i2i = image_to_image(bundle, image, PROMPTS, strength=1.0, **kw)
    assert torch.equal(i2i, t2i)


def test_img2img_partial_strength_runs_the_last_steps_from_the_noised_image(bundle, image):
    seen = []
    calls, hook = count_unet_calls(bundle.unet)
    try:
        out = image_to_image(bundle, image, "a red circle", strength=0.5, steps=10, guidance_scale=1.0, seed=0,
                             callback=lambda i, t, x, x0: seen.append(t))
    finally:
        hook.remove()
    assert len(calls) == 5
    assert seen == make_timesteps(bundle.schedule, 10)[5:].long().tolist()
    weak = image_to_image(bundle, image, "a red circle", strength=0.2, steps=10, guidance_scale=1.0, seed=0)
    with torch.no_grad():
        round_trip = bundle.autoencoder.decode_latents(bundle.autoencoder.encode_latents(image, sample=False))
    assert (weak - round_trip).abs().mean() < (out - round_trip).abs().mean()  # less strength, closer to the input


# ---------------------------------------------------------------------------------------------------------------
# inpainting


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_inpaint_keeps_pixels_outside_the_mask_and_changes_the_inside(bundle, image, sampler):
    mask = square_mask()
    latents = []
    out = inpaint(bundle, image, mask, "a blue square", sampler=sampler, steps=4, seed=0,
                  callback=lambda i, t, x, x0: latents.append(x))
    outside = mask.expand_as(out) == 0
    assert torch.equal(out[outside], image.expand_as(out)[outside])
    assert (out - image)[~outside].abs().mean() > 0.05
    # the per-step blend: after the last step the latent outside the (latent) mask is the image latent itself
    with torch.no_grad():
        z0 = bundle.autoencoder.encode_latents(image, sample=False)
    keep = torch.nn.functional.max_pool2d(mask, 2).expand_as(z0) == 0
    assert torch.equal(latents[-1][keep], z0[keep])


def test_inpaint_feather_blends_only_inside_the_mask(bundle, image):
    mask = square_mask(2, 14)
    hard = inpaint(bundle, image, mask, "a", steps=3, seed=0)
    soft = inpaint(bundle, image, mask, "a", steps=3, seed=0, feather=2)
    outside = mask.expand_as(hard) == 0
    assert torch.equal(soft[outside], image.expand_as(soft)[outside])
    assert torch.equal(soft[..., 8, 8], hard[..., 8, 8])  # deep inside: all generated
    edge = soft[..., 2, 8]  # first row inside the mask: between the input and the generated pixel
    assert not torch.equal(edge, hard[..., 2, 8]) and not torch.equal(edge, image[..., 2, 8])


def test_inpaint_partial_strength_and_pil_inputs(bundle, image):
    from ldm.pipelines import to_pil

    pil_image, pil_mask = to_pil(image)[0], to_pil(square_mask().expand(1, 3, 16, 16) * 2 - 1)[0]
    out = inpaint(bundle, pil_image, pil_mask, "a", strength=0.5, steps=4, seed=0)
    assert out.shape == (1, 3, 16, 16)


def test_keep_known_region_hook():
    z0, noise = torch.full((1, 1, 2, 2), 2.0), torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    x = KeepKnownRegion(z0, noise, mask)(0, torch.full((1, 1, 2, 2), 9.0), 0.6, 0.8)
    assert x.flatten().tolist() == pytest.approx([9.0, 2.0, 2.0, 2.0])  # 0.6 * 2 + 0.8 * 1


def test_nine_channel_inpainting_unet(clip_folder, image):
    bundle = tiny_bundle(clip_folder, seed=3, in_channels=9)
    mask = square_mask()
    inputs = []
    hook = bundle.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    try:
        out = inpaint(bundle, image, mask, PROMPTS, steps=3, guidance_scale=4.0, seed=0)
    finally:
        hook.remove()
    assert len(inputs) == 3 and all(x.shape == (4, 9, 8, 8) for x in inputs)  # CFG batch 2 x 2 prompts
    with torch.no_grad():
        masked = bundle.autoencoder.encode_latents(image * (mask < 0.5), sample=False)
    small = torch.nn.functional.interpolate(mask, size=(8, 8), mode="nearest")
    assert torch.equal(inputs[0][:, 4:5], small.expand(4, 1, 8, 8))
    torch.testing.assert_close(inputs[0][:, 5:], masked.expand(4, 4, 8, 8))
    outside = mask.expand_as(out) == 0
    assert torch.equal(out[outside], image.expand_as(out)[outside])
    with pytest.raises(ValueError, match="inpainting model"):
        text_to_image(bundle, "a", height=16, width=16, steps=2)


# ---------------------------------------------------------------------------------------------------------------
# load_bundle


def test_sd_single_file_round_trip(tmp_path, bundle, clip_folder):
    path = save_single_file(tmp_path / "model.safetensors", bundle, resolution=16)
    assert detect_source(path) == "sd_single_file"
    loaded = load_bundle(path, text_encoder=clip_folder)
    assert same_weights(loaded.unet, bundle.unet) and same_weights(loaded.autoencoder, bundle.autoencoder)
    assert same_weights(loaded.text_encoder.model, bundle.text_encoder.model)
    assert loaded.unet.config == bundle.unet.config and loaded.meta["resolution"] == 16
    assert torch.equal(loaded.schedule.betas, bundle.schedule.betas)
    kw = dict(steps=3, height=16, width=16, seed=0)
    assert torch.equal(text_to_image(loaded, PROMPTS, **kw), text_to_image(bundle, PROMPTS, **kw))
    v = load_bundle(path, text_encoder=clip_folder, prediction_type="v_prediction")
    assert v.schedule.prediction_type == "v_prediction"


def test_sd_ckpt_without_header_infers_the_sizes_and_picks_ema(tmp_path, bundle, clip_folder):
    ema_unet = randomize(UNet.from_preset("tiny"), 11)
    state = to_single_file(bundle.unet, bundle.autoencoder, bundle.text_encoder)
    state.update({_ema_key(f"model.diffusion_model.{k}"): v for k, v in ema_unet.state_dict().items()})
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, path)
    assert detect_source(path) == "sd_single_file"
    heads = {"num_heads": 2}  # heads are not in the weights: SD1's rule would say 8
    ema = load_bundle(path, text_encoder=clip_folder, unet_config=heads)
    plain = load_bundle(path, text_encoder=clip_folder, unet_config=heads, use_ema=False)
    assert same_weights(ema.unet, ema_unet) and same_weights(plain.unet, bundle.unet)
    assert plain.meta["ema"] is False and ema.meta["ema"] is True
    assert plain.unet.config == bundle.unet.config and plain.autoencoder.config == bundle.autoencoder.config
    assert plain.schedule.kind == "scaled_linear" and plain.schedule.beta_end == 0.012


def test_config_inference_matches_the_sd_presets():
    with torch.device("meta"):
        for preset in ("sd15", "sd15-inpaint", "sd21"):
            unet = UNet.from_preset(preset)
            cfg = infer_unet_config(unet.state_dict())
            assert cfg == {k: unet.config[k] for k in cfg}, preset
        vae = AutoencoderKL.from_preset("sd")
        cfg = infer_vae_config(vae.state_dict())
        assert cfg == {k: vae.config[k] for k in cfg}


def test_diffusers_folder_round_trip(tmp_path, bundle, clip_folder):
    folder = save_diffusers_folder(tmp_path / "diffusers", bundle.unet, bundle.autoencoder, bundle.text_encoder,
                                   scheduler={"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                              "beta_end": 0.012, "prediction_type": "v_prediction"},
                                   sample_size=8)
    assert detect_source(folder) == "diffusers"
    loaded = load_bundle(folder)
    assert same_weights(loaded.unet, bundle.unet) and same_weights(loaded.autoencoder, bundle.autoencoder)
    assert same_weights(loaded.text_encoder.model, bundle.text_encoder.model)
    assert loaded.schedule.prediction_type == "v_prediction" and loaded.meta["resolution"] == 16
    torch.testing.assert_close(loaded.schedule.betas, NoiseSchedule.make("scaled_linear").betas)
    other_te = CLIPTextEncoder.from_pretrained(clip_folder)
    assert load_bundle(folder, text_encoder=other_te).text_encoder is other_te


def test_source_errors_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="nowhere/model.ckpt"):
        load_bundle(tmp_path / "nowhere" / "model.ckpt")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown model file type '.txt'"):
        load_bundle(tmp_path / "notes.txt")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="model.diffusion_model"):
        load_bundle(tmp_path / "other.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="ldm_bundle.json"):
        load_bundle(tmp_path / "empty")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.ckpt"):
        load_bundle(tmp_path / "broken.ckpt")


def test_unknown_hub_id_offline_is_file_not_found(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert detect_source("no-such-org/no-such-model") == "hub"
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        load_bundle("no-such-org/no-such-model")


def test_training_checkpoint_and_export_bundle_dispatch(tmp_path, monkeypatch, bundle):
    """Detection and lazy dispatch only; the real loaders are tested with their own code."""
    seen = []

    def fake_loader(path, use_ema=True):
        seen.append((str(path), use_ema))
        return ModelBundle(bundle.unet, bundle.autoencoder, bundle.text_encoder, bundle.schedule)

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"unet.out.2.weight": torch.zeros(1)}, "hyper_parameters": {"lr": 1e-4}}, ckpt)
    import ldm.formats.load

    monkeypatch.setattr(ldm.formats.load, "load_training_checkpoint", fake_loader)
    assert detect_source(ckpt) == "training_checkpoint"
    loaded = load_bundle(ckpt, use_ema=False)
    assert seen == [(str(ckpt), False)] and loaded.meta["format"] == "training_checkpoint"

    export = tmp_path / "export"
    export.mkdir()
    (export / "ldm_bundle.json").write_text("{}")
    monkeypatch.setattr(ldm.formats.load, "load_ldm_bundle", fake_loader)
    assert detect_source(export) == "ldm_bundle"
    assert load_bundle(export, prediction_type="v_prediction").schedule.prediction_type == "v_prediction"
    assert seen[-1] == (str(export), True)
