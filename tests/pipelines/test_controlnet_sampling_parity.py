"""Sampling with ControlNets equals diffusers' StableDiffusionControlNetPipeline (same seed, SD's DDIM, CFG): one
ControlNet, and two at once with their own scales and guidance ranges; the ControlNet goes to diffusers through our
folder writer (``ControlNetModel.from_pretrained``). img2img and inpainting compose with the same wrapper."""

import pytest
import torch
from PIL import Image

from ldm.formats.controlnet_file import write_controlnet_folder
from ldm.formats.load import load_bundle
from ldm.models.controlnet import ControlNet
from ldm.pipelines import image_to_image, inpaint, text_to_image
from ldm.pipelines.controlnet import Control
from ldm.pipelines.sampling_options import SamplingOptions
from tests.helpers.sample import model  # noqa: F401 - the tiny random SD single file + tiny CLIP folder
from tests.helpers.sample import export_folder  # noqa: F401 - our diffusers export

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, N = "a red circle", "blue", 3, 10, 5.0, 2
DDIM_SD = SamplingOptions(name="ddim", steps=STEPS, steps_offset=1, final_alpha_one=False)


@pytest.fixture(scope="module")
def bundle(model):
    ckpt, clip = model
    return load_bundle(ckpt, text_encoder=clip, device="cpu", dtype="float32")


@torch.no_grad()
def random_controlnet(unet, seed):
    net = ControlNet.from_unet(unet, hint_channels=(8, 16))  # the tiny VAE's factor 2
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if name.startswith(("zero_convs", "middle_block_out", "input_hint_block")):  # not zero: a visible effect
            p.copy_(0.3 * torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.ndim > 1 else 1))
    return net.eval()


def control_png(seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(16, 16, 3, generator=g) > 0.5).to(torch.uint8).mul(255).numpy()
    return Image.fromarray(pixels)


def as_control_tensor(pil):
    import numpy as np

    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


CASES = {
    "one": [dict(scale=0.8, start=0.0, end=1.0)],
    "two with ranges": [dict(scale=0.7, start=0.0, end=0.6), dict(scale=1.3, start=0.2, end=1.0)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_controlnet_sampling_equals_diffusers(bundle, export_folder, tmp_path, case):  # noqa: F811
    settings = CASES[case]
    nets = [random_controlnet(bundle.unet, 10 + i) for i in range(len(settings))]
    images = [control_png(20 + i) for i in range(len(settings))]
    folders = [write_controlnet_folder(net, tmp_path / f"cn{i}") for i, net in enumerate(nets)]
    theirs = [diffusers.ControlNetModel.from_pretrained(f) for f in folders]
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        export_folder, controlnet=theirs if len(theirs) > 1 else theirs[0], safety_checker=None,
        local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    one = len(settings) == 1
    pick = (lambda key: settings[0][key]) if one else (lambda key: [s[key] for s in settings])

    def diffusers_run(output_type):
        return pipe(PROMPT, image=images[0] if one else images, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, height=16, width=16, num_images_per_prompt=N,
                    generator=torch.Generator().manual_seed(SEED), controlnet_conditioning_scale=pick("scale"),
                    control_guidance_start=pick("start"), control_guidance_end=pick("end"),
                    output_type=output_type).images

    ref, ref_images = diffusers_run("latent"), diffusers_run("pt") * 2 - 1  # [0, 1] -> our [-1, 1]

    latents = {}
    control = [Control(net, as_control_tensor(im), **s) for net, im, s in zip(nets, images, settings)]

    def run(control):
        def keep(i, t, x, x0):
            latents["last"] = x
        images = text_to_image(bundle, PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=N, sampler=DDIM_SD,
                               guidance_scale=GUIDANCE, height=16, width=16, seed=SEED, callback=keep,
                               control=control)
        return latents["last"], images

    ours, our_images = run(control)
    # this random model's latents reach |25|: float32 resolves them to ~2e-6, so latents are compared relative to
    # their scale (measured 5e-7 of it), the decoded images absolutely
    assert (ours - ref).abs().max() <= 1e-6 * ref.abs().max()
    torch.testing.assert_close(our_images, ref_images, atol=1e-5, rtol=0)
    plain, plain_images = run(None)
    assert (plain - ref).abs().max() > 1e-2 and (plain_images - ref_images).abs().max() > 1e-3  # they matter


def test_img2img_and_inpainting_take_controlnets(bundle):
    net = random_controlnet(bundle.unet, 7)
    hint = as_control_tensor(control_png(5))
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    common = dict(sampler=DDIM_SD, guidance_scale=GUIDANCE, seed=1)
    for run in (lambda c: image_to_image(bundle, image, PROMPT, strength=0.6, control=c, **common),
                lambda c: inpaint(bundle, image, mask, PROMPT, strength=1.0, control=c, **common)):
        plain, with_control = run(None), run([Control(net, hint)])
        off = run([Control(net, hint, scale=0.0)])
        torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)  # scale 0: no change
        assert (with_control - plain).abs().max() > 1e-3


def test_bad_control_inputs_name_the_fix(bundle):
    net = random_controlnet(bundle.unet, 7)
    with pytest.raises(ValueError, match="control image 0: shape"):
        text_to_image(bundle, PROMPT, height=16, width=16, steps=2, control=[Control(net, torch.zeros(1, 3, 8, 8))])
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        Control(net, torch.zeros(1, 3, 16, 16), start=0.5, end=0.5)
    wide = ControlNet.from_unet(bundle.unet, hint_channels=(8, 16, 32))
    with pytest.raises(ValueError, match="downsamples by 4, the VAE by 2"):
        text_to_image(bundle, PROMPT, height=16, width=16, steps=2, control=[Control(wide, torch.zeros(1, 3, 16, 16))])
