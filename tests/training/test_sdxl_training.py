"""An SDXL-shaped model (model=sdxl_tiny: dual text encoder, vector conditioning) trains on the CPU, with the
micro-conditioning read from the batch, and its checkpoint samples."""

import pytest
import torch

from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.training import SDXL_TINY, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")



def test_sdxl_tiny_trains_a_few_steps_and_its_checkpoint_samples(tmp_path):
    from ldm.formats.load import load_bundle
    from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
    from ldm.pipelines import text_to_image

    # data.latent_cache on (latents cached, captions encoded live); the sampling callback draws a grid at step 3
    result = train(compose_train(tmp_path, SDXL_TINY + [
        "callbacks=default", "callbacks.prompt_accuracy=null", "callbacks.vae_check=null",
        "callbacks.sampling.n_prompts=2", "callbacks.sampling.every_n_steps=3", "sampler.steps=2",
        "model.text_encoder.max_chunks=2"]))
    assert result["global_step"] == 3
    assert result["metrics"]["train/loss"] > 0 and "val/loss" in result["metrics"]
    assert list((tmp_path / "run" / "samples").glob("step_*.png"))
    bundle = load_bundle(result["last_checkpoint"], device="cpu", dtype="float32")
    assert isinstance(bundle.text_encoder, DualCLIPTextEncoder) and bundle.unet.config["adm_in_channels"] == 1552
    assert bundle.text_encoder.max_chunks == 2  # long prompts: both encoders in chunks of 75 tokens
    images = text_to_image(bundle, ["a red circle", "a blue square"], steps=3, guidance_scale=4.0, height=16,
                           width=16, seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # the run exports in every format (SDXL single file + sd_xl_base-style yaml, ldm bundle with bigG)
    from ldm.formats.exporter import export

    for fmt, out in (("single-file", tmp_path / "xl.safetensors"), ("ldm", tmp_path / "xl-bundle")):
        export(result["last_checkpoint"], fmt, out, allow_unloadable=True)  # a tiny SDXL: not ComfyUI's
    assert (tmp_path / "xl.yaml").is_file()
    again = load_bundle(tmp_path / "xl-bundle", device="cpu", dtype="float32")
    assert again.text_encoder.max_chunks == 2
    assert all(torch.equal(v, again.unet.state_dict()[k]) for k, v in bundle.unet.state_dict().items())


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    return build_diffusion_module(compose_train(tmp_path_factory.mktemp("sdxl_module"), SDXL_TINY))


def _batch(**sizes):
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(3, 4, 8, 8, generator=g), "caption": ["a red circle", "a blue square", "x"],
            **{k: torch.as_tensor(v) for k, v in sizes.items()}}


def test_micro_conditioning_comes_from_the_batch(module):
    from ldm.models.sdxl_conditioning import size_embedding

    sizes = dict(original_size=[[20, 30], [16, 16], [64, 48]], crop_top_left=[[2, 0], [0, 0], [0, 8]],
                 target_size=[[16, 16], [16, 16], [16, 16]])
    batch = _batch(**sizes)
    text = module.encode_text(batch["caption"])
    dropped = torch.tensor([False, True, False])
    cond = module._unet_conditioning(text, batch, dropped, batch["latents"])
    values = torch.cat([torch.as_tensor(sizes[k]) for k in ("original_size", "crop_top_left", "target_size")], 1)
    torch.testing.assert_close(cond["vector"][:, 16:], size_embedding(values.float()))
    torch.testing.assert_close(cond["vector"][[0, 2], :16], text["pooled"][[0, 2]])
    assert not cond["vector"][1, :16].any() and not cond["crossattn"][1].any()  # dropped: zero text (SGM ucg)
    assert cond["vector"][1, 16:].any()  # ... the size embedding stays
    # without the keys: an uncropped image of the latents' size (8 x VAE factor 2 = 16)
    plain = module._unet_conditioning(text, _batch(), torch.zeros(3, dtype=torch.bool), batch["latents"])
    want = size_embedding(torch.tensor([[16.0, 16, 0, 0, 16, 16]]).expand(3, -1))
    torch.testing.assert_close(plain["vector"][:, 16:], want)
    with pytest.raises(ValueError, match="crop_top_left"):
        module._unet_conditioning(text, _batch(original_size=sizes["original_size"]), dropped, batch["latents"])


def test_loss_sees_the_micro_conditioning(module):
    """The training loss depends on the batch's size values (same noise, same timesteps)."""
    sizes = dict(original_size=[[16, 16]] * 3, crop_top_left=[[0, 0]] * 3, target_size=[[16, 16]] * 3)
    other = dict(sizes, crop_top_left=[[8, 4]] * 3)
    module.p_uncond = 0.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh U-Net's zero-initialised output layers would hide every input but x_t
        for p in module.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        a = module.step_loss(_batch(**sizes))
        torch.manual_seed(1)
        b = module.step_loss(_batch(**sizes))
        torch.manual_seed(1)
        c = module.step_loss(_batch(**other))
    assert float(a) == float(b) and abs(float(a) - float(c)) > 1e-6


def test_mismatched_vector_conditioning_is_a_config_error(tmp_path):
    cfg = compose_train(tmp_path, SDXL_TINY + ["model.unet.adm_in_channels=100"])
    with pytest.raises(ConfigError, match="model.unet.adm_in_channels=1552"):
        build_diffusion_module(cfg)


def test_sdxl_finetune_needs_its_weights(tmp_path):
    """The placeholder fails first, naming the key (before the tokenizers would be fetched from the hub)."""
    cfg = compose_train(tmp_path, ["experiment=sdxl_finetune", f"data.train.root={tmp_path}"])
    with pytest.raises(ConfigError, match="model.pretrained is not set"):
        build_diffusion_module(cfg)
    cfg = compose_train(tmp_path, ["experiment=sdxl_finetune", f"data.train.root={tmp_path}",
                                   f"model.pretrained={tmp_path / 'sd_xl_base_1.0.safetensors'}"])
    with pytest.raises(ConfigError, match="sd_xl_base_1.0.safetensors: no such file"):
        build_diffusion_module(cfg)


def test_sdxl_trains_on_buckets_with_their_micro_conditioning(tmp_path, monkeypatch):
    """Mixed aspect ratios, bucketed (from the latent cache): every training batch reaches the U-Net with the
    original_size / crop_top_left / target_size the buckets recorded."""
    from tests.helpers.training import BUCKETS

    from PIL import Image

    root = tmp_path / "mixed"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate([(48, 16)] * 4 + [(16, 48)] * 4):
        Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()).save(
            root / f"{i}.png")
        (root / f"{i}.txt").write_text("a wide picture" if size[0] > size[1] else "a tall picture")
    import ldm.training.module.diffusion_module as dm

    seen = []
    real = dm.training_conditioning

    def spy(text, batch, dropped, image_size, zero_dropped):
        seen.append({k: batch[k].tolist() for k in ("original_size", "crop_top_left", "target_size") if k in batch})
        return real(text, batch, dropped, image_size, zero_dropped)

    monkeypatch.setattr(dm, "training_conditioning", spy)
    keep = [o for o in SDXL_TINY if not o.startswith(("data.train.size", "data.val.", "data.batch_size"))]
    result = train(compose_train(tmp_path, keep + BUCKETS + [f"data.train.root={root}", "data.val_fraction=0",
                                                             "trainer.limit_val_batches=0",
                                                             f"++data.latent_cache={tmp_path / 'cache'}"]))
    assert result["global_step"] == 3
    train_rows = [s for s in seen if s]
    assert train_rows and all(len(s["original_size"]) == len(s["target_size"]) for s in train_rows)
    originals = {tuple(r) for s in train_rows for r in s["original_size"]}
    targets = {tuple(r) for s in train_rows for r in s["target_size"]}
    assert originals <= {(16, 48), (48, 16)} and targets <= {(8, 24), (24, 8)}  # (h, w): the image, its bucket
