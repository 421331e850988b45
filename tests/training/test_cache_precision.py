"""data.latent_cache_dtype: the frozen networks build the latent cache under autocast in the device's best dtype
(auto: bfloat16 where it is native), the rows stay float32 and close to float32's, the cache folder is keyed by
the precision, and a batch that overflows in half precision is encoded again in float32."""

import json

import pytest
import torch

from ldm.data.auto_cache import cache_spec
from ldm.data.datamodule import ImageCaptionDataModule
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.tasks.shapes.dataset import ShapesDataset
from ldm.training.run import latent_prep
from ldm.training.run.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_auto_is_bfloat16_only_where_the_device_computes_it_natively(monkeypatch):
    monkeypatch.setattr(latent_prep, "native_bf16", lambda device: True)
    assert latent_prep.encode_precision("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(latent_prep, "native_bf16", lambda device: False)
    assert latent_prep.encode_precision("auto", CPU) == torch.float32
    assert latent_prep.encode_precision("float16", CPU) == torch.float16  # only when asked for: SDXL's VAE overflows
    assert latent_prep.encode_precision("FLOAT32", CPU) == torch.float32
    with pytest.raises(ValueError, match="data.latent_cache_dtype: 'half' is not one of auto, float32"):
        latent_prep.encode_precision("half", CPU)
    with pytest.raises(ValueError, match="latent_cache_dtype must be auto, float32, bfloat16 or float16"):
        ImageCaptionDataModule(train=ShapesDataset(size=4, resolution=16), latent_cache_dtype="fp8")
    assert latent_prep.native_bf16(torch.device("meta")) is False


def _networks(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL.from_preset("tiny").eval().requires_grad_(False)
    text = CLIPTextEncoder.from_tiny("tiny", folder=tmp_path / "clip").eval().requires_grad_(False)
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    return vae, text, images, ["a cat", "a dog", "a cat", "a cow", "a bird", "a dog"]


@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_rows_are_float32_and_close_to_float32s(tmp_path, monkeypatch, threads):
    vae, text, images, captions = _networks(tmp_path)
    monkeypatch.setattr(latent_prep, "encode_threads", lambda device: threads)  # autocast is per thread
    monkeypatch.setattr(latent_prep, "CPU_ENCODE_PIXELS", 2 * 16 * 16)
    full = latent_prep.make_encode(vae, text, "posterior")(images, captions)
    encode = latent_prep.make_encode(vae, text, "posterior", torch.bfloat16)
    half = encode(images, captions)
    assert encode.fallbacks == 0
    for name in ("mean", "logvar", "context"):
        assert half[name].dtype == torch.float32 and half[name].shape == full[name].shape
        assert not torch.equal(half[name], full[name]), f"{name}: the networks did not run in bfloat16"
        error = (half[name] - full[name]).norm() / full[name].norm()
        assert error < 3e-2, f"{name}: relative error {error:.3g} against float32"
    monkeypatch.setattr(latent_prep, "encode_threads", lambda device: 1)
    again = latent_prep.make_encode(vae, text, "posterior", torch.bfloat16)(images, captions)
    assert all(torch.equal(half[k], again[k]) for k in half), "threads change no bit in bfloat16 either"


def test_a_batch_that_overflows_in_half_precision_is_encoded_again_in_float32(tmp_path):
    vae, _, images, captions = _networks(tmp_path)
    encode_latents = vae.encode_latents

    def overflowing(x, sample=False):  # as SDXL's VAE in float16: inf inside autocast, fine outside
        z = encode_latents(x, sample=sample)
        return z * torch.inf if torch.is_autocast_enabled("cpu") else z

    vae.encode_latents = overflowing
    encode = latent_prep.make_encode(vae, None, "mode", torch.float16)
    rows = encode(images, captions)
    assert encode.fallbacks == 1
    with torch.no_grad():
        torch.testing.assert_close(rows["latents"], encode_latents(images, sample=False), atol=0, rtol=0)


def test_the_cache_folder_is_keyed_by_precision_and_float32_keeps_its_name(tmp_path):
    vae, text, _, _ = _networks(tmp_path)
    spec = cache_spec(ShapesDataset(size=4, resolution=16))
    plain = latent_prep.cache_folder(tmp_path, spec, vae, "posterior", text)
    assert latent_prep.cache_folder(tmp_path, spec, vae, "posterior", text, torch.float32) == plain
    bf16 = latent_prep.cache_folder(tmp_path, spec, vae, "posterior", text, torch.bfloat16)
    fp16 = latent_prep.cache_folder(tmp_path, spec, vae, "posterior", text, torch.float16)
    assert len({plain, bf16, fp16}) == 3


def test_a_run_encodes_its_cache_in_the_chosen_precision(tiny_cfg, tmp_path, monkeypatch, capsys):
    """train(cfg) passes data.latent_cache_dtype on: auto (here bfloat16) and float32 runs build two caches, and
    bfloat16 asked for by name reuses auto's."""
    monkeypatch.setattr(latent_prep, "native_bf16", lambda device: True)
    common = [f"paths.cache_dir={tmp_path / 'cache'}", "data.latent_cache=${paths.cache_dir}/latents",
              "data.train.size=8", "trainer.max_steps=2"]
    train(tiny_cfg(*common, "data.latent_cache_dtype=auto", f"paths.run_dir={tmp_path / 'auto'}"))
    train(tiny_cfg(*common, "data.latent_cache_dtype=float32", f"paths.run_dir={tmp_path / 'fp32'}"))
    out = capsys.readouterr().out
    assert out.count("encoding 8 image(s) once") == 2 and "nothing new to encode" not in out
    folders = sorted((tmp_path / "cache" / "latents").iterdir())
    assert len(folders) == 2
    manifests = [json.loads((f / "part-00000" / "manifest.json").read_text()) for f in folders]
    assert all(m["complete"] and m["num_samples"] == 8 for m in manifests)
    train(tiny_cfg(*common, "data.latent_cache_dtype=bfloat16", f"paths.run_dir={tmp_path / 'bf16'}"))
    assert "nothing new to encode" in capsys.readouterr().out, "auto meant bfloat16 here: the same cache"
