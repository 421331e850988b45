"""train(cfg) end to end on tiny settings: every data source, frozen parts, dropout rate, bad data and config."""

import json
import logging

import datasets
import pytest
import torch
from PIL import Image

from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.data import write_green_shards


def _images(folder, n=8, size=20):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.new("RGB", (size, size), (30 * i % 255, 100, 200)).save(folder / name)
        names.append(name)
    return names


def test_shapes(tiny_cfg):
    result = train(tiny_cfg("data.val.resolution=16"))
    assert result["global_step"] == 3
    assert "val/loss" in result["metrics"] and result["metrics"]["train/loss"] > 0


def test_folder_with_metadata_jsonl(tiny_cfg, tmp_path):
    root = tmp_path / "jsonl"
    names = _images(root)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"photo {i}"}) + "\n"
                                                 for i, n in enumerate(names)))
    result = train(tiny_cfg("data=folder", f"data.train.root={root}", "data.train.resolution=16",
                            "data.num_workers=0", "data.val_fraction=0.25"))
    assert result["global_step"] == 3


def test_folder_with_txt_sidecars(tiny_cfg, tmp_path):
    root = tmp_path / "txt"
    for i, n in enumerate(_images(root)):
        (root / n).with_suffix(".txt").write_text(f"caption {i}")
    result = train(tiny_cfg("data=folder", f"data.train.root={root}", "data.train.resolution=16",
                            "data.num_workers=0", "data.val_fraction=0"))
    assert result["global_step"] == 3


def test_hf_dataset_saved_to_disk(tiny_cfg, tmp_path):
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (20, 20), (i * 20, 0, 0)) for i in range(8)],
                                     "text": [f"red {i}" for i in range(8)]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    result = train(tiny_cfg("data=hf", f"data.train.path={tmp_path / 'hf'}", "data.train.resolution=16",
                            "data.num_workers=0", "data.val_fraction=0"))
    assert result["global_step"] == 3


def test_webdataset_shards(tiny_cfg, tmp_path):
    urls = write_green_shards(tmp_path, shards=2, per_shard=6, stem="shard")
    result = train(tiny_cfg("data=webdataset", f"data.train.urls='{urls}'", "data.train.resolution=16",
                            "data.num_workers=0", "data.train.shuffle_buffer=4", "trainer.limit_val_batches=0"))
    assert result["global_step"] == 3


def test_frozen_parts_stay_frozen(tiny_cfg):
    cfg = tiny_cfg("trainer.limit_val_batches=0")
    import lightning as L
    from hydra.utils import instantiate

    module = build_diffusion_module(cfg)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    after = module.state_dict()
    for prefix in ("autoencoder.", "text_encoder."):
        keys = [k for k in before if k.startswith(prefix)]
        assert keys and all(torch.equal(before[k], after[k]) for k in keys), prefix
    unet_keys = [k for k in before if k.startswith("unet.") and before[k].is_floating_point()]
    assert any(not torch.equal(before[k], after[k]) for k in unet_keys)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.unet.parameters()}
    assert not any(p.requires_grad for p in module.autoencoder.parameters())
    assert not any(p.requires_grad for p in module.text_encoder.parameters())
    assert not module.autoencoder.training and not module.text_encoder.training


def test_conditioning_dropout_rate(tiny_cfg):
    module = build_diffusion_module(tiny_cfg("module.p_uncond=0.3"))
    torch.manual_seed(0)
    dropped = sum(int(module.drop_captions(["a caption"] * 100)[1].sum()) for _ in range(100))
    assert abs(dropped / 10_000 - 0.3) < 0.02
    captions, mask = module.drop_captions(["x"] * 50)
    assert all((c == "") == bool(m) for c, m in zip(captions, mask))
    # the dropped caption is encoded exactly as the empty-prompt context sampling uses
    torch.testing.assert_close(module.encode_text([""]), module.text_encoder.empty_context(1))


def test_corrupt_images_are_skipped_named_and_counted(tiny_cfg, tmp_path, caplog):
    root = tmp_path / "bad"
    names = _images(root, n=8)
    (root / "corrupt.png").write_bytes(b"not an image at all")
    good = (root / names[0]).read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    for n in names + ["corrupt.png", "truncated.png"]:
        (root / n).with_suffix(".txt").write_text("a thing")
    with caplog.at_level(logging.WARNING):
        result = train(tiny_cfg("data=folder", f"data.train.root={root}", "data.train.resolution=16",
                                "data.num_workers=0", "data.val_fraction=0", "data.batch_size=5",
                                "trainer.max_steps=4", "+data.shuffle=false"))
    assert result["global_step"] == 4
    text = caplog.text
    assert "corrupt.png" in text and "truncated.png" in text


@pytest.mark.parametrize("override,match", [
    ("data.batch_size=0", "data.batch_size"),
    ("model.unet.in_channels=3", "in_channels"),
    ("model.unet.context_dim=64", "context_dim"),
    ("model.autoencoder.preset=nope", "model.autoencoder"),
    ("data.train.size=0", "data"),
    ("ckpt_path=/nonexistent/x.ckpt", "ckpt_path"),
])
def test_bad_config_stops_before_training(tiny_cfg, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        train(tiny_cfg(override))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_latent_cache(tiny_cfg, tmp_path):
    """Train from cached VAE posteriors + text contexts (no VAE or text encoder call per step for the data)."""
    from ldm.data.latent_cache import build_latent_cache
    from ldm.tasks.shapes.dataset import ShapesDataset
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.text_encoder import CLIPTextEncoder

    text = CLIPTextEncoder.from_tiny(folder=tmp_path / "clip")
    build_latent_cache(ShapesDataset(size=24, resolution=16), tmp_path / "cache", AutoencoderKL.from_preset("tiny"),
                       text, shard_size=10, batch_size=8, progress=False)
    from tests.helpers.training import TINY_MODEL, compose_train

    overrides = [o for o in TINY_MODEL if not o.startswith("data.train.resolution")]  # latents have no resolution
    result = train(compose_train(tmp_path, overrides + ["data=latent_cache", f"data.train.path={tmp_path / 'cache'}",
                                                        "data.num_workers=0", "data.val_fraction=0.2"]))
    assert result["global_step"] == 3 and result["metrics"]["val/loss"] > 0
