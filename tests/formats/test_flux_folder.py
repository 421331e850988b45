"""A whole FLUX.1 diffusers folder: a tiny FluxPipeline laid out like black-forest-labs/FLUX.1-dev (written by
diffusers' own FluxPipeline.save_pretrained: FluxTransformer2DModel, a 16-channel AutoencoderKL without quant convs,
CLIPTextModel + T5EncoderModel, FlowMatchEulerDiscreteScheduler with dynamic shifting) loads into our Flux, VAE,
FluxTextEncoder and flow schedule, and samples FluxPipeline's latents and images (load_bundle and sample.py
ckpt=<folder>); a hub id of such a repo is read from this machine's cache; tampered configs are refused naming the
key before anything is allocated."""

import json
import shutil

import numpy as np
import pytest
import torch

from ldm.formats.detect import detect_source
from ldm.formats.load import load_bundle
from ldm.formats.safe_load import CheckpointError
from ldm.pipelines import text_to_image
from tests.helpers.flux import PROMPTS, our_latents, pipeline_latents, write_tiny_flux_folder

pytestmark = pytest.mark.usefixtures("one_thread")
diffusers = pytest.importorskip("diffusers")

@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(folder, pipeline): FLUX.1-dev's kind (guidance embedding, dynamic shift)."""
    return write_tiny_flux_folder(tmp_path_factory.mktemp("flux"))


def test_flux_folder_loads_and_samples_the_pipelines_latents_and_images(flux):
    from ldm.models.flux import Flux
    from ldm.models.text_encoder_flux import FluxTextEncoder

    folder, pipe = flux
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert detect_source(folder) == "flux_diffusers"
    bundle = load_bundle(folder)
    assert isinstance(bundle.unet, Flux) and bundle.unet.guidance_embeds
    assert isinstance(bundle.text_encoder, FluxTextEncoder) and bundle.text_encoder.t5 is not None
    assert bundle.text_encoder.t5_length == 512  # FluxPipeline's max_sequence_length default
    s = bundle.schedule
    assert (s.dynamic_shift, s.base_shift, s.max_shift, s.base_seq_len, s.max_seq_len, s.spacing) == (
        True, 0.5, 1.15, 256, 4096, "flux")
    vae = bundle.autoencoder
    assert vae.latent_channels == 16 and not any("quant_conv" in k for k in vae.state_dict())
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    assert bundle.meta == {"format": "flux_diffusers", "resolution": 128 * 2, "vae_fp32": True}
    expected = pipeline_latents(pipe, PROMPTS)
    assert expected.abs().max() > 0.5  # a real signal
    torch.testing.assert_close(our_latents(bundle), expected, atol=1e-5, rtol=0)
    # decoded: latent / 0.3611 + 0.1159 through the VAE, as FluxPipeline decodes; ours in [-1, 1], its "pt" in [0, 1]
    images = pipe(PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=3.5, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    ours = text_to_image(bundle, PROMPTS, sampler="flow_euler", steps=3, guidance_scale=3.5, height=16, width=16,
                         seed=7)
    assert images.std() > 0.05
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), images, atol=1e-5, rtol=0)


def test_sample_py_writes_the_pipelines_image(flux, tmp_path):
    """sample.py ckpt=<the folder>: its PNG is FluxPipeline's PIL image (the same seed), within one 8-bit level."""
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from ldm.pipelines.cli import register_configs, sample
    from tests.helpers import CONFIGS

    folder, pipe = flux
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={folder}", f"out_dir={tmp_path}", "prompt=a red circle",
                                           "n_images=1", "sampler=flow_euler", "sampler.steps=3", "seed=7",
                                           "guidance_scale=3.5", "height=16", "width=16", "dtype=float32",
                                           "device=cpu", "grid=false"])
    written = sample(cfg)
    assert [p.name for p in written] == ["00000.png"]
    theirs = pipe(["a red circle"], height=16, width=16, num_inference_steps=3, guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(7)).images[0]
    ours = np.asarray(Image.open(written[0]).convert("RGB"), dtype=np.int16)
    theirs = np.asarray(theirs, dtype=np.int16)
    assert theirs.std() > 5 and np.abs(ours - theirs).max() <= 1


def test_schnell_scheduler_and_a_sensitive_comparison(tmp_path):
    """FLUX.1-schnell's scheduler (no dynamic shifting, shift 1.0) is read as such, and sampling with FLUX.1-dev's
    schedule instead gives other latents: the comparisons above can fail."""
    folder, pipe = write_tiny_flux_folder(tmp_path, shift={"use_dynamic_shifting": False, "shift": 1.0})
    bundle = load_bundle(folder)
    assert (bundle.schedule.dynamic_shift, bundle.schedule.shift, bundle.schedule.spacing) == (False, 1.0, "flux")
    expected = pipeline_latents(pipe, PROMPTS, steps=2)
    torch.testing.assert_close(our_latents(bundle, steps=2), expected, atol=1e-5, rtol=0)
    bundle.schedule = type(bundle.schedule)(dynamic_shift=True, spacing="flux")
    assert (our_latents(bundle, steps=2) - expected).abs().max() > 1e-2


def test_a_hub_id_of_a_flux_repo_is_read_as_flux(flux, monkeypatch, tmp_path):
    """A hub id is a folder once its files are here (huggingface_hub's snapshot, stood in for: no network in tests):
    a FLUX.1 repo goes to the Flux loader for sampling and for model.pretrained."""
    import ldm.formats.sd3_folder as sd3_folder
    from ldm.formats.training_checkpoint import load_weights_into

    folder, _ = flux
    monkeypatch.setattr(sd3_folder, "resolve_folder", lambda hub_id: folder)
    bundle = load_bundle("someone/tiny-flux")
    assert bundle.meta["format"] == "flux_diffusers" and bundle.source == "someone/tiny-flux"
    shutil.copytree(folder, tmp_path / "elsewhere")  # text encoders built from another folder: filled from the repo
    fresh = load_bundle(tmp_path / "elsewhere")
    with torch.no_grad():
        for m in (fresh.unet, fresh.autoencoder, fresh.text_encoder):
            for p in m.parameters():
                p.zero_()
    kind = load_weights_into("someone/tiny-flux", fresh.unet, fresh.autoencoder, fresh.text_encoder)
    assert kind == "flux_diffusers"
    for name in ("unet", "autoencoder", "text_encoder"):
        theirs = getattr(fresh, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(bundle, name).state_dict().items()), name


def _tamper(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_tampered_flux_folders_are_refused_before_allocation(flux, tmp_path, monkeypatch):
    """Huge sizes and unknown classes in a folder's configs are refused naming the key, before any network or
    tensor is allocated (nn.Linear is never constructed off the meta device)."""
    from torch import nn

    folder, _ = flux
    cases = [("transformer/config.json", {"num_layers": 10**6}, "num_layers"),
             ("transformer/config.json", {"num_attention_heads": 256, "attention_head_dim": 1024,  # each bounded,
                                          "axes_dims_rope": [256, 384, 384]}, "parameters"),  # 4e11 weights in all
             ("transformer/config.json", {"_class_name": "SD3Transformer2DModel"}, "_class_name"),
             ("vae/config.json", {"latent_channels": 10**7}, "latent_channels"),
             ("text_encoder_2/config.json", {"d_model": 10**9}, "d_model"),
             ("text_encoder/config.json", {"hidden_size": 10**8}, "hidden_size"),
             ("scheduler/scheduler_config.json", {"_class_name": "DPMSolverMultistepScheduler"}, "_class_name"),
             ("scheduler/scheduler_config.json", {"max_image_seq_len": 10**12}, "max_seq_len"),
             ("scheduler/scheduler_config.json", {"use_karras_sigmas": True}, "use_karras_sigmas")]
    real_init = nn.Linear.__init__

    def on_meta_only(self, *args, **kwargs):
        if kwargs.get("device") != "meta" and torch.get_default_device().type != "meta":
            raise AssertionError("a network was allocated")
        real_init(self, *args, **kwargs)

    for i, (file, fields, match) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(folder, bad)
        _tamper(bad / file, **fields)
        with monkeypatch.context() as m:
            if file.startswith("transformer"):  # read first: nothing may be built before it is refused
                m.setattr(nn.Linear, "__init__", on_meta_only)
            with pytest.raises(CheckpointError, match=match):
                load_bundle(bad)
    # bounded, but not the weights': the tensors' shapes are compared before the weights are copied
    bad = tmp_path / "shape"
    shutil.copytree(folder, bad)
    _tamper(bad / "text_encoder_2" / "config.json", d_model=32)
    with pytest.raises(CheckpointError, match="shape"):
        load_bundle(bad)
    # another pipeline's class in model_index.json: no FLUX.1 folder, and no other loader guesses at it
    _tamper(bad / "model_index.json", _class_name="SomeOtherPipeline")
    with pytest.raises(ValueError, match="_class_name = 'SomeOtherPipeline'"):
        load_bundle(bad)


def test_without_t5_the_tokens_are_zeros(flux, tmp_path):
    """text_encoder_2/ is optional (a folder without it, or sample.py t5=false): the T5 tokens are zeros, the
    CLIP-L pooled vector FluxPipeline.encode_prompt's."""
    folder, pipe = flux
    bare = tmp_path / "no_t5"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    te = load_bundle(bare).text_encoder
    assert te.t5 is None
    out = te(PROMPTS)
    _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=512)
    torch.testing.assert_close(out["vector"], pooled, atol=1e-6, rtol=0)
    assert out["crossattn"].shape == (2, 512, 24) and not out["crossattn"].any()
    # sample.py t5=false on the whole folder: the same context
    from ldm.pipelines.cli import skip_t5

    bundle = load_bundle(folder)
    full = bundle.text_encoder(PROMPTS)["crossattn"]
    skip_t5(bundle)
    dropped = bundle.text_encoder(PROMPTS)
    assert bundle.text_encoder.t5 is None and full.abs().max() > 1e-3  # the T5 mattered
    assert all(torch.equal(dropped[k], out[k]) for k in out)
