"""Every file ldm writes is readable by group and others under the usual umask 022 (files 0644, folders 0755),
whatever the library writing it does (safetensors' save_file and tempfile.mkstemp create 0600 files), so that a
ComfyUI or A1111 server running as another user can read a run's LoRA or export; under umask 077 nothing is opened
to them (ldm/file_modes.py). One test calls each writer; another walks a whole run (training with Lightning's
checkpoints, sample grids and the latent cache, a LoRA and a textual-inversion run, every export, sample.py)."""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ldm.file_modes import apply_umask, current_umask, default_mode, write_safetensors
from tests.helpers.models import bundle, clip_folder  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")
MASKS = [0o022, 0o077]


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def wrong_modes(root: Path, mask: int) -> list[str]:
    """Entries under ``root`` (itself included) whose mode the umask does not explain: under 022 every file must be
    readable by group and others (mode & 0o044) and every folder listable (0o055); under 077 nothing may be open to
    them (mode & 0o077 == 0)."""
    assert root.exists(), root
    bad = []
    for p in [root, *sorted(root.rglob("*"))]:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.lstat().st_mode)
        need = (0o055 if p.is_dir() else 0o044) & ~mask
        ok = (mode & need) == need and not (mode & 0o077 & mask)
        if not ok:
            bad.append(f"{p} {oct(mode)}")
    return bad


def test_the_umask_is_read_without_being_changed(monkeypatch):
    with umask(0o027):
        assert current_umask() == 0o027 and default_mode() == 0o640 and default_mode(is_dir=True) == 0o750
        real_open = open

        def no_proc(path, *args, **kwargs):  # a system without /proc/self/status: the round trip
            if str(path) == "/proc/self/status":
                raise OSError("no /proc")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", no_proc)
        assert current_umask() == 0o027
        monkeypatch.undo()
        assert os.umask(0o027) == 0o027  # left as it was


@pytest.mark.parametrize("mask", MASKS)
def test_private_files_and_folders_get_the_umask_mode(tmp_path, mask):
    with umask(mask):
        fd, name = tempfile.mkstemp(dir=tmp_path)  # 0600 whatever the umask
        os.close(fd)
        folder = tempfile.mkdtemp(dir=tmp_path)  # 0700
        assert stat.S_IMODE(os.stat(name).st_mode) == 0o600
        apply_umask(name), apply_umask(folder)
        write_safetensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~mask
    assert stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("mask", MASKS)
def test_every_writer_respects_the_umask(bundle, tmp_path, mask):  # noqa: F811
    from PIL import Image

    from ldm.data.latent_cache import build_latent_cache
    from ldm.formats.autoencoder_file import save_autoencoder
    from ldm.formats.embeddings import save_embedding
    from ldm.formats.exporter import export
    from ldm.formats.lora_files import bundle_roots, save_lora_file
    from ldm.models.lora import LoRAConfig, LoRANetwork
    from ldm.models.tiny_clip import write_tiny_clip
    from ldm.pipelines.png import save_png
    from ldm.tasks.shapes.dataset import ShapesDataset
    from ldm.training.run.resume import AtomicCheckpointIO

    out = tmp_path / "out"
    with umask(mask):
        roots = bundle_roots(bundle)
        net = LoRANetwork.build(roots, LoRAConfig(rank=2, preset="attention"))
        save_lora_file(net, roots, out / "lora" / "kohya.safetensors")
        save_lora_file(net, roots, out / "lora" / "peft", layout="peft")
        save_embedding(out / "emb" / "learned_embeds.safetensors", "<t>", torch.randn(2, 32))
        save_embedding(out / "emb" / "t.safetensors", "<t>", torch.randn(2, 32), layout="a1111")
        save_autoencoder(bundle.autoencoder, out / "vae.safetensors")
        write_tiny_clip(out / "clip")
        build_latent_cache(ShapesDataset(size=4, resolution=16, seed=0), out / "cache", bundle.autoencoder,
                           shard_size=2, batch_size=2, progress=False)
        save_png(Image.new("RGB", (8, 8)), out / "samples" / "00000.png", {"prompt": "x"})
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, out / "ckpt" / "last.ckpt")
        for fmt, target in (("diffusers", "pipe"), ("ldm", "bundle"), ("single-file", "model.safetensors")):
            export(bundle, fmt, out / "exports" / target, resolution=16, allow_unloadable=True)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 30 and any(p.suffix == ".safetensors" for p in written)
    assert wrong_modes(out, mask) == []


@pytest.mark.parametrize("mask", [0o022, pytest.param(0o077, marks=pytest.mark.slow)])  # ~17 s, ~8 s on 1 core
def test_every_file_of_a_run_its_adapters_exports_and_samples(tmp_path, mask):
    """A tiny run with the default callbacks (ModelCheckpoint with last.ckpt, sample grids, the VAE check) and the
    automatic latent cache, a LoRA run and a textual-inversion run on it, every export format and sample.py: every
    file and folder they made, walked."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldm.formats.exporter import FORMATS, export
    from ldm.pipelines.cli import register_configs, sample
    from ldm.training.run.train import train
    from tests.helpers import CONFIGS
    from tests.helpers.training import CKPT, TINY_MODEL, compose_train

    fast = ["callbacks=default", "callbacks.sampling.every_n_steps=0", "sampler.steps=2", "callbacks.sampling.n_prompts=2",
            "callbacks.prompt_accuracy=null", "callbacks.vae_check.n_images=4", "trainer.max_steps=2",
            "data.train.size=8"]
    made = tmp_path / "made"
    with umask(mask):
        base = train(compose_train(made / "base", TINY_MODEL + fast + ["++data.latent_cache=${paths.cache_dir}/latents"]))
        pretrained = f"model.pretrained={base['last_checkpoint']}"
        lora = train(compose_train(made / "lora", TINY_MODEL + CKPT + [pretrained, "adapter=lora",
                                                                       "trainer.max_steps=1", "data.train.size=8"]))
        ti = train(compose_train(made / "ti", TINY_MODEL + CKPT + [
            pretrained, "adapter=textual_inversion", "adapter.placeholder_token='<new>'", "adapter.init_token=blue",
            "+data.train.colors=[cyan]", "+data.train.template='a <new> {shape} on a {background} background'",
            "trainer.max_steps=1", "data.train.size=8"]))
        for fmt in FORMATS:
            export(base["last_checkpoint"], fmt, made / "exports" / (fmt + (".safetensors" if fmt == "single-file"
                                                                           else "")), allow_unloadable=True)
        register_configs()
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose("sample", overrides=[f"ckpt={base['last_checkpoint']}", f"out_dir={made / 'samples'}",
                                               "sampler.steps=2", "n_images=2", "prompt=a red circle"])
        sample(cfg)
    run = Path(base["run_dir"])
    assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.rglob("*.png"))  # Lightning's and ours
    assert list((made / "ldm-cache").rglob("*.safetensors"))  # the latent cache and its manifest
    assert (Path(lora["run_dir"]) / "lora.safetensors").is_file()
    assert (Path(ti["run_dir"]) / "learned_embeds.safetensors").is_file()
    assert wrong_modes(made, mask) == []
