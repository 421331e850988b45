"""A Flux model exported as a FLUX.1 diffusers folder (``python -m ldm.export --format diffusers``): diffusers'
FluxPipeline.from_pretrained loads it unchanged and samples our latents (flow-Euler steps, within 1e-5), and our own
loader reads it back weight for weight; a training run started from a tiny FLUX.1 folder exports the same way."""

import json

import pytest
import torch

from ldm.formats.common import ExportError
from ldm.formats.exporter import export
from ldm.formats.load import load_bundle
from tests.helpers.flux import PROMPTS, our_latents, pipeline_latents, write_tiny_flux_folder
from tests.helpers.models import perturbed

pytestmark = pytest.mark.usefixtures("one_thread")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return write_tiny_flux_folder(tmp_path_factory.mktemp("flux"))


def same_weights(a, b):
    for name in ("unet", "autoencoder", "text_encoder"):
        theirs = getattr(b, name).state_dict()
        ours = getattr(a, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items()), name


@pytest.mark.parametrize("t5", [True, False])
def test_export_loads_in_flux_pipeline_unchanged_with_equal_latents(flux, tmp_path, t5):
    from diffusers import FluxPipeline

    folder, _ = flux
    bundle = perturbed(load_bundle(folder))
    if not t5:
        bundle.text_encoder.drop_t5()
    out = tmp_path / "export"
    result = export(bundle, "diffusers", out)
    assert "FluxPipeline.from_pretrained" in result.notes[0]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert (index["text_encoder_2"] == [None, None]) == (not t5)
    assert json.loads((out / "vae" / "config.json").read_text())["use_quant_conv"] is False
    pipe = FluxPipeline.from_pretrained(out, **({} if t5 else dict(text_encoder_2=None, tokenizer_2=None)))
    if t5:
        expected = pipeline_latents(pipe, PROMPTS)
    else:  # FluxPipeline without a T5 takes its tokens from the caller: ours are zeros
        context = bundle.text_encoder(PROMPTS)
        expected = pipeline_latents(pipe, None, prompt_embeds=context["crossattn"],
                                    pooled_prompt_embeds=context["vector"])
        assert "text_encoder_2=None" in result.notes[1]
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(our_latents(bundle), expected, atol=1e-5, rtol=0)
    # ... and it reads back into ours exactly (FluxPipeline's schedule: its sigmas and dynamic shift)
    again = load_bundle(out)
    assert again.meta["format"] == "flux_diffusers" and again.schedule == bundle.schedule
    same_weights(bundle, again)


def test_what_a_flux_folder_cannot_hold_is_refused_before_writing(flux, tmp_path):
    from ldm.diffusion.flow import FlowMatching

    folder, _ = flux
    bundle = load_bundle(folder)
    bundle.schedule = FlowMatching(dynamic_shift=True)  # table spacing: FluxPipeline would sample other sigmas
    with pytest.raises(ExportError, match="spacing=flux"):
        export(bundle, "diffusers", tmp_path / "table")
    assert not (tmp_path / "table").exists()
    bare = export(load_bundle(folder), "diffusers", tmp_path / "bare", frozen=False)
    assert bare.written == ["transformer/", "scheduler/", "model_index.json"]
    assert "(transformer/, scheduler/ and model_index.json only); pass them in: FluxPipeline" in bare.notes[0]
    with pytest.raises(ExportError, match="FLUX.1 diffusers folder"):
        export(load_bundle(folder), "single-file", tmp_path / "flux.safetensors")


def test_a_flux_training_run_exports_as_a_flux1_folder(flux, tmp_path, capsys):
    """Trained 2 steps from the tiny FLUX.1 folder, its checkpoint exported with ``python -m ldm.export``'s main:
    FluxPipeline samples the run's latents (its T5 length: the run's, given as max_sequence_length) and our loader
    reads back the weights the run trained."""
    from diffusers import FluxPipeline

    from ldm.cli.export import main
    from ldm.formats.exporter import load_source
    from ldm.training.run.train import train
    from tests.helpers.data import write_captioned_noise
    from tests.helpers.flux import flux_run
    from tests.helpers.training import CKPT, compose_train

    folder, pipe = flux
    images = write_captioned_noise(tmp_path / "images")
    run = train(compose_train(tmp_path / "run", flux_run(folder, images, "optim.lr=1e-3", *CKPT)))
    assert run["global_step"] == 2
    out = tmp_path / "export"
    assert main([run["last_checkpoint"], "--format", "diffusers", "--out", str(out)]) == 0
    assert "max_sequence_length=8" in capsys.readouterr().out  # the run's T5 length, not FluxPipeline's 512
    source = load_source(run["last_checkpoint"])
    trained = source.unet.final_layer.linear.weight
    assert not torch.equal(trained, pipe.transformer.state_dict()["proj_out.weight"])  # it trained
    exported = FluxPipeline.from_pretrained(out)
    assert torch.equal(exported.transformer.proj_out.weight, trained)
    expected = pipeline_latents(exported, PROMPTS, max_sequence_length=source.text_encoder.t5_length)
    torch.testing.assert_close(our_latents(source), expected, atol=1e-5, rtol=0)
    same_weights(source, load_bundle(out))
