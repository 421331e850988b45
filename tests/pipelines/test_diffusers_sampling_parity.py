"""``sample.py sampler=ddim_diffusers`` makes the images that diffusers' StableDiffusionPipeline makes from our
diffusers export (``python -m ldm.cli.export <model> --format diffusers``) with the same prompt, seed and settings:
DDIMScheduler with SD's config (leading, steps_offset 1, set_alpha_to_one false), classifier-free guidance on.

The initial noise is not passed in: both draw it from ``torch.Generator().manual_seed(seed)`` (one float32
``randn`` of the whole batch's latent shape), so the same seed gives the same latents."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ldm.pipelines.cli import register_configs, sample
from ldm.pipelines.sampling_options import SamplingOptions
from tests.helpers.sample import export_folder, model  # noqa: F401 - the tiny random SD single file + tiny CLIP folder, its diffusers export

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, N = "a red circle", "blue", 3, 10, 5.0, 2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(export_folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(export_folder, safety_checker=None,
                                                             local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    sched = pipe.scheduler
    assert isinstance(sched, diffusers.DDIMScheduler)  # the exported scheduler: SD's DDIM settings
    assert (sched.config.timestep_spacing, sched.config.steps_offset, sched.config.set_alpha_to_one,
            sched.config.clip_sample) == ("leading", 1, False, False)
    return pipe


def diffusers_run(pipe, output_type):
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=16,
                width=16, num_images_per_prompt=N, generator=torch.Generator().manual_seed(SEED),
                output_type=output_type).images


def sample_py(source, clip, out_dir, *overrides):
    """``python sample.py ckpt=<source> ...`` (composed as Hydra does) -> the N images as uint8 arrays."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=[
            f"ckpt={source}", f"text_encoder={clip}", f"out_dir={out_dir}", f"prompt='{PROMPT}'",
            f"negative_prompt={NEGATIVE}", f"seed={SEED}", f"n_images={N}", f"batch_size={N}",
            f"guidance_scale={GUIDANCE}", "height=16", "width=16", "grid=false", f"sampler.steps={STEPS}",
            *overrides])
    paths = sample(cfg)
    assert len(paths) == N
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).astype(np.int16)


@pytest.mark.parametrize("source", ["the single file", "our diffusers export"])
def test_sample_py_ddim_diffusers_equals_diffusers_pipeline(model, export_folder, pipe, source, tmp_path):
    ckpt, clip = model
    ref = np.stack([np.asarray(im) for im in diffusers_run(pipe, "pil")]).astype(np.int16)
    assert ref.std() > 10 and ((ref > 0) & (ref < 255)).mean() > 0.9  # a real image, not saturated
    mine = sample_py(ckpt if source == "the single file" else export_folder, clip, tmp_path, "sampler=ddim_diffusers")
    assert mine.shape == ref.shape == (N, 16, 16, 3)
    assert np.abs(mine - ref).max() <= 1  # within 1/255 per pixel


def test_the_pipeline_equals_diffusers_in_float_and_the_option_matters(model, pipe):
    """Before rounding to 8 bits: equal to 1e-5 with SD's DDIM settings; without either of them (our default
    ddim, no steps_offset, or a last step to abar = 1) the image moves by more (this random model's noise
    predictions are small, so the 8-bit images above differ by at most 1/255 even then)."""
    from ldm.formats.load import load_bundle
    from ldm.pipelines import text_to_image

    ckpt, clip = model
    bundle = load_bundle(ckpt, text_encoder=clip, device="cpu", dtype="float32")
    ref = diffusers_run(pipe, "pt") * 2 - 1  # [0, 1] -> our [-1, 1]

    def ours(options):
        return text_to_image(bundle, PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=N, sampler=options,
                             guidance_scale=GUIDANCE, height=16, width=16, seed=SEED)

    sd = SamplingOptions(name="ddim", steps=STEPS, steps_offset=1, final_alpha_one=False)
    torch.testing.assert_close(ours(sd), ref, atol=1e-5, rtol=0)  # measured: 3.6e-7
    others = (SamplingOptions(name="ddim", steps=STEPS), sd.replace(steps_offset=0), sd.replace(final_alpha_one=True))
    for other in others:
        assert (ours(other) - ref).abs().max() > 5e-5, other  # measured: 1.2e-3, 1.1e-3, 1.7e-4
