"""What runs before fit with the frozen networks (the latent cache build, DreamBooth's class images) runs on the
device the run trains on: Lightning moves the module only when fit starts, so without this a GPU run would encode
its training set (and sample its class images) on the CPU."""

from pathlib import Path

import pytest
import torch

import ldm.training.run.class_images as class_images
from ldm.training.run import latent_prep
from ldm.training.run.train import build_diffusion_module, train
from tests.helpers.training import TINY_MODEL, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_the_build_device_is_the_training_device(four_gpus, monkeypatch):
    device = latent_prep.cache_device
    assert device("cpu", 1) == torch.device("cpu"), "trainer=cpu encodes on the CPU though a GPU is there"
    assert device("gpu", 1) == torch.device("cuda", 0)
    assert device("auto", "auto") == torch.device("cuda", 0)
    assert device("cuda", [2, 3]) == torch.device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # DDP's second process on this node: its own GPU
    assert device("gpu", -1) == torch.device("cuda", 1)
    assert device("gpu", [2, 3]) == torch.device("cuda", 3)
    assert device("gpu", "0,2") == torch.device("cuda", 2)
    assert device("gpu", 2) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device("auto", "auto").type in ("cpu", "mps")
    assert device("cpu", 1) == torch.device("cpu")


def test_on_device_moves_there_and_back(monkeypatch):
    moves = []
    nets = [torch.nn.Linear(2, 2), torch.nn.Conv2d(1, 1, 1)]
    for i, net in enumerate(nets):
        monkeypatch.setattr(net, "to", lambda d, i=i: moves.append((i, torch.device(d))))
    with latent_prep.on_device(nets, torch.device("cuda", 1)):
        assert moves == [(0, torch.device("cuda", 1)), (1, torch.device("cuda", 1))]
        moves.clear()
    assert moves == [(0, torch.device("cpu")), (1, torch.device("cpu"))], "back where they were"
    moves.clear()
    with pytest.raises(RuntimeError), latent_prep.on_device(nets, torch.device("cuda", 0)):
        raise RuntimeError("the build failed")
    assert moves[-2:] == [(0, torch.device("cpu")), (1, torch.device("cpu"))], "back even after an error"
    moves.clear()
    with latent_prep.on_device(nets, None):
        assert moves == []


def test_a_run_builds_its_cache_and_class_images_on_its_trainer_device(tiny_cfg, tmp_path, monkeypatch):
    asked, moved = [], []
    real = latent_prep.on_device

    def recording_device(accelerator, devices):
        asked.append((accelerator, devices))
        return torch.device("cpu")

    def recording_move(modules, device):
        moved.append((sorted(type(m).__name__ for m in modules), device))
        return real(modules, device)

    monkeypatch.setattr(latent_prep, "cache_device", recording_device)
    monkeypatch.setattr(latent_prep, "on_device", recording_move)
    train(tiny_cfg(f"paths.cache_dir={tmp_path / 'cache'}", "data.latent_cache=${paths.cache_dir}/latents",
                   "data.train.size=8", "trainer.max_steps=1", "trainer.devices=1"))
    assert asked == [("cpu", 1)]
    assert moved == [(["AutoencoderKL", "CLIPTextEncoder"], torch.device("cpu"))]

    asked.clear(), moved.clear()
    instance = tmp_path / "instance"
    instance.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (16, 16), (20 * i, 200, 220)).save(instance / f"{i}.png")
    cfg = compose_train(tmp_path / "db", [o for o in TINY_MODEL if "latent_cache" not in o] + [
        "data=dreambooth", f"data.train.instance_root={instance}", "data.train.instance_prompt='a sks square'",
        f"data.train.class_root={tmp_path / 'class'}", "data.train.class_prompt='a square'",
        "data.train.num_class_images=2", "data.train.resolution=16", "data.batch_size=2", "class_images.batch_size=2",
        "sampler.steps=1"])
    module = build_diffusion_module(cfg)
    assert class_images.ensure_class_images(cfg, module, progress=False) == 2
    assert asked == [(cfg.trainer.accelerator, cfg.trainer.devices)]
    assert moved == [([type(module).__name__], torch.device("cpu"))]
    assert len(list(Path(tmp_path / "class").glob("*.png"))) == 2
