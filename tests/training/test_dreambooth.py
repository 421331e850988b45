"""DreamBooth end to end on a tiny model: class images sampled from the base (seeded, resumable after a kill),
instance + class rows in every step, prior loss weighted by module.prior_loss_weight, masks, full fine-tuning and
adapter=lora, the latent cache over both folders."""

import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import ldm.training.run.class_images as class_images
from ldm.diffusion.losses import diffusion_loss
from ldm.training.module.diffusion_module import LatentDiffusion
from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.training import TINY_MODEL, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

CKPT = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"]


def instance_folder(root: Path, n: int = 3) -> Path:
    """Cyan squares with a transparent border (their alpha channel is the mask)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((16, 16, 4), 255, np.uint8)
        a[4:12, 4:12, :3] = (20, 200, 220)
        a[..., 3] = 0
        a[2:14, 2:14, 3] = 255
        a[0, 0, 0] = i
        Image.fromarray(a, "RGBA").save(root / f"{i}.png")
    return root


def dreambooth(tmp_path: Path, *extra: str) -> list[str]:
    return [o for o in TINY_MODEL if "latent_cache" not in o] + [
        "data=dreambooth", f"data.train.instance_root={instance_folder(tmp_path / 'instance')}",
        "data.train.instance_prompt='a sks square'", f"data.train.class_root={tmp_path / 'class'}",
        "data.train.class_prompt='a square'", "data.train.num_class_images=5", "data.train.resolution=16",
        "data.batch_size=2", "class_images.batch_size=2", "sampler.steps=2", *extra]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Full fine-tuning with masks from alpha and the latent cache on; records every training batch's rows."""
    tmp = tmp_path_factory.mktemp("dreambooth")
    seen = []
    original = LatentDiffusion.batch_loss

    def recording(self, output, target, t, batch):
        if torch.is_grad_enabled():
            seen.append((batch["is_prior"].tolist(), tuple(batch["mask"].shape), list(batch["caption"]),
                         "latents" in batch))
        return original(self, output, target, t, batch)

    LatentDiffusion.batch_loss = recording
    try:
        result = train(compose_train(tmp, dreambooth(tmp, "data.train.mask_from_alpha=true",
                                                     "module.prior_loss_weight=0.5", *CKPT)))
    finally:
        LatentDiffusion.batch_loss = original
    return tmp, result, seen


def test_class_images_are_generated_and_every_step_has_both_halves(full_run):
    tmp, result, seen = full_run
    assert sorted(p.name for p in (tmp / "class").iterdir()) == sorted(f"{k:05d}.{e}" for k in range(5)
                                                                       for e in ("png", "txt"))
    assert (tmp / "class" / "00003.txt").read_text() == "a square\n"  # each image's prompt, as its caption
    assert Image.open(tmp / "class" / "00000.png").size == (16, 16)
    assert result["global_step"] == 3 and np.isfinite(result["metrics"]["train/loss"])
    assert len(seen) == 3
    for is_prior, mask_shape, captions, from_cache in seen:
        assert is_prior == [False, False, True, True] and mask_shape == (4, 1, 16, 16)
        assert captions == ["a sks square"] * 2 + ["a square"] * 2  # (caption dropout comes later, in step_loss)
        assert from_cache, "both halves are read from the latent cache"


def test_a_second_run_generates_nothing(full_run, capsys):
    tmp, _, _ = full_run
    cfg = compose_train(tmp, dreambooth(tmp))
    assert class_images.ensure_class_images(cfg, build_diffusion_module(cfg)) == 0
    assert "none to generate" in capsys.readouterr().out


def test_lora_trains_on_dreambooth_batches(full_run, tmp_path):
    base_tmp, base, _ = full_run
    result = train(compose_train(tmp_path, dreambooth(tmp_path, "adapter=lora", "adapter.rank=2",
                                                      f"model.pretrained={base['last_checkpoint']}", *CKPT)))
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith(("lora.", "ema.")) for k in ckpt["state_dict"])
    ups = [v for k, v in ckpt["state_dict"].items() if k.startswith("lora.") and "up" in k]
    assert ups and any(float(v.abs().max()) > 0 for v in ups), "the adapter learned (its up weights start at 0)"
    assert (Path(result["run_dir"]) / "lora.safetensors").is_file()
    assert len(list((tmp_path / "class").glob("*.png"))) == 5  # sampled from the (trained) base


def test_prior_loss_weight_and_masks_in_the_step_loss(tmp_path):
    cfg = compose_train(tmp_path, dreambooth(tmp_path, "module.prior_loss_weight=0.25", "module.min_snr_gamma=5"))
    L.seed_everything(0)
    module = build_diffusion_module(cfg)
    g = torch.Generator().manual_seed(0)
    output, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 300, 600, 900])
    mask = torch.rand(4, 1, 16, 16, generator=g)
    batch = {"is_prior": torch.tensor([False, False, True, True]), "mask": mask}
    s, gamma = module.schedule, 5.0
    expected = (diffusion_loss(output[:2], target[:2], s, t[:2], gamma, mask=mask[:2])
                + 0.25 * diffusion_loss(output[2:], target[2:], s, t[2:], gamma, mask=mask[2:]))
    torch.testing.assert_close(module.batch_loss(output, target, t, batch), expected)
    # a plain batch: exactly the loss of before
    assert torch.equal(module.batch_loss(output, target, t, {}), diffusion_loss(output, target, s, t, gamma))


def test_generation_resumes_after_a_kill_to_the_same_images(tmp_path, monkeypatch):
    cfg = compose_train(tmp_path, dreambooth(tmp_path, "data.train.num_class_images=5",
                                             f"data.train.class_root={tmp_path / 'reference'}"))
    L.seed_everything(0)
    module = build_diffusion_module(cfg)
    assert class_images.ensure_class_images(cfg, module, progress=False) == 5

    killed = compose_train(tmp_path, dreambooth(tmp_path, f"data.train.class_root={tmp_path / 'killed'}"))
    calls = []
    real_replace = os.replace

    def dying_replace(src, dst):
        if len(calls) == 7:  # caption, image, ...: the 4th image (in the middle of batch 1) is never renamed into place
            raise KeyboardInterrupt("killed")
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(class_images.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        class_images.ensure_class_images(killed, module, progress=False)
    monkeypatch.setattr(class_images.os, "replace", real_replace)
    assert sorted(p.name for p in (tmp_path / "killed").glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert list((tmp_path / "killed").glob("*.tmp"))  # the half-written file of the kill
    assert class_images.ensure_class_images(killed, module, progress=False) == 2  # continues at 3
    names = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "killed").iterdir())  # the .tmp was removed
    for name in names:
        if name.endswith(".txt"):
            assert (tmp_path / "reference" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes()
            continue
        a = np.asarray(Image.open(tmp_path / "reference" / name))
        b = np.asarray(Image.open(tmp_path / "killed" / name))
        assert np.array_equal(a, b), name


def test_a_list_of_class_prompts_cycles_and_captions_each_image(tmp_path, monkeypatch):
    prompts = ["a square", "a red circle", "a blue triangle"]
    cfg = compose_train(tmp_path, dreambooth(tmp_path, "data.train.num_class_images=5",
                                             f"data.train.class_prompt=[{','.join(repr(p) for p in prompts)}]"))
    module = build_diffusion_module(cfg)
    seen = []
    import ldm.pipelines as pipelines

    original = pipelines.text_to_image

    def recording(bundle, batch_prompts, **kw):
        seen.extend(batch_prompts)
        return original(bundle, batch_prompts, **kw)

    monkeypatch.setattr(pipelines, "text_to_image", recording)
    assert class_images.ensure_class_images(cfg, module, progress=False) == 5
    assert seen == [prompts[k % 3] for k in range(5)]  # image k: prompt k mod 3
    root = Path(cfg.data.train.class_root)
    assert [(root / f"{k:05d}.txt").read_text().strip() for k in range(5)] == seen
    from ldm.data.dreambooth import DreamBoothDataset

    ds = DreamBoothDataset(instance_folder(tmp_path / "inst2"), "a sks square", root, list(prompts),
                           num_class_images=5, resolution=16)
    assert [ds[k]["prior"]["caption"] for k in range(5)] == seen


def test_a_class_folder_without_class_prompt_names_the_key(tmp_path):
    cfg = compose_train(tmp_path, dreambooth(tmp_path, "data.train.class_prompt=null", "trainer.max_steps=1"))
    with pytest.raises(ConfigError, match="class_prompt"):
        train(cfg)


def test_a_stopped_dreambooth_run_resumes_exactly(tmp_path):
    """5 pairs in batches of 2 (2 per epoch): stopped after step 3, mid-epoch 1, then resumed to step 5; the same
    losses and weights as an uninterrupted run (pair order, cached posterior draws and class rows all restored)."""
    from tests.helpers.training import assert_same_run

    common = dreambooth(tmp_path, "data.train.mask_from_alpha=true", "trainer.val_check_interval=null",
                        "trainer.limit_val_batches=0", "module.ema_decay=0.9", "+logger.csv.flush_logs_every_n_steps=1",
                        "+callbacks.checkpoint.every_n_train_steps=1", *CKPT)
    reference = compose_train(tmp_path / "reference", [*common, "trainer.max_steps=5"])
    train(reference)
    stopped = compose_train(tmp_path / "stopped", [*common, "trainer.max_steps=3"])
    first = train(stopped)
    resumed = compose_train(tmp_path / "stopped", [*common, "trainer.max_steps=5",
                                                   f"ckpt_path={first['last_checkpoint']}"])
    train(resumed)
    assert_same_run(tmp_path / "reference" / "run", tmp_path / "stopped" / "run")


def test_a_missing_instance_folder_names_the_key(tmp_path):
    cfg = compose_train(tmp_path, dreambooth(tmp_path, f"data.train.instance_root={tmp_path / 'nowhere'}",
                                             "data.train.class_root=null", "data.train.class_prompt=null"))
    with pytest.raises(ConfigError, match="data.train.instance_root: folder not found"):
        train(cfg)
