"""data.latent_cache: the training set is encoded once by the frozen VAE, reused by later runs, keyed by the data
and the VAE weights, and training from it is reproducible; image folders are cached automatically."""

import json
import threading

import pytest
import torch

from ldm.data.cached_latents import CachedLatentsDataset
from ldm.data.latent_cache import build_latent_cache
from ldm.tasks.shapes.dataset import ShapesDataset
from ldm.models.autoencoder import AutoencoderKL
from ldm.data.auto_cache import cache_spec
from ldm.training.run.latent_prep import cache_folder
from ldm.training.run.train import ConfigError, train
from tests.helpers.training import assert_same_run, logged_losses

CACHE = ["data.latent_cache=${paths.cache_dir}/latents", "data.train.size=40", "trainer.max_steps=12"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_encoded_once_then_reused_with_identical_training(tiny_cfg, tmp_path, capsys):
    own = [*CACHE, f"paths.cache_dir={tmp_path / 'own-cache'}"]  # not the session's shared cache: others fill it
    first = train(tiny_cfg(*own))
    out = capsys.readouterr().out
    assert "encoding 40 image(s) once" in out and "nothing new to encode" not in out
    folders = list((tmp_path / "own-cache" / "latents").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("ShapesDataset-")
    part = folders[0] / "part-00000"
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 40 and manifest["store"] == "posterior"
    assert manifest["text"] == "context", "the frozen text encoder's contexts are cached too"
    shard_mtime = (part / "shard-00000.safetensors").stat().st_mtime_ns
    losses = logged_losses(tmp_path / "run")

    second = train(tiny_cfg(*own, "paths.run_dir=" + str(tmp_path / "again")))
    assert "nothing new to encode" in capsys.readouterr().out
    assert (part / "shard-00000.safetensors").stat().st_mtime_ns == shard_mtime
    assert logged_losses(tmp_path / "again") == losses, "a reused cache trains exactly like a fresh one"
    assert second["metrics"]["train/loss"] == first["metrics"]["train/loss"]


def test_cached_training_sees_the_same_latents_as_encoding_on_the_fly(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL.from_preset("tiny").eval()
    ds = ShapesDataset(size=8, resolution=16)
    folder = tmp_path / "c"
    build_latent_cache(ds, folder, vae, None, store="posterior", text="caption", progress=False)
    cached = CachedLatentsDataset(folder, sample=False)
    images = torch.stack([ds[i]["image"] for i in range(8)])
    with torch.no_grad():
        expected = vae.encode_latents(images, sample=False)
    got = torch.stack([cached[i]["latents"] for i in range(8)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert [cached[i]["caption"] for i in range(8)] == [ds[i]["caption"] for i in range(8)]


def test_cache_folder_depends_on_data_and_vae_weights(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL.from_preset("tiny")

    def folder(vae=vae, store="posterior", **kwargs):
        return cache_folder(tmp_path, cache_spec(ShapesDataset(**{"size": 8, "resolution": 16, **kwargs})), vae, store)

    a = folder()
    assert a == folder()
    assert a != folder(size=9)
    assert a != folder(seed=1)
    assert a != folder(store="mode")
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    assert a != folder()


def test_a_dataset_without_cache_spec_is_refused_before_training(tiny_cfg, tmp_path):
    cfg = tiny_cfg("data.train._target_=tests.training.test_latent_prep.PlainDataset", "~data.train.size",
                   "~data.train.resolution", "~data.train.seed", "~data.train.colors", "~data.val",
                   "++data.latent_cache=${paths.cache_dir}/latents")
    with pytest.raises(ConfigError, match="data.latent_cache=null"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


class PlainDataset(torch.utils.data.Dataset):
    """A user's own dataset that does not say what its samples depend on."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 16, 16), "caption": "x"}


def test_clean_stop_mid_epoch_then_resume_from_the_cache_is_exact(tmp_path):
    """Two epochs over a 24-sample cache (new posterior draws in the second), stopped at step 4 and resumed."""
    import subprocess

    from tests.helpers import ROOT
    from tests.helpers.training import child_env, resume_cmd

    cache = tmp_path / "cache"
    on = ["++data.latent_cache=${paths.cache_dir}/latents", "+callbacks.checkpoint.every_n_train_steps=1"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    subprocess.run(resume_cmd(reference, cache, *on), cwd=ROOT, env=child_env(), check=True, capture_output=True)
    assert len(list((cache / "latents").iterdir())) == 1
    cmd = resume_cmd(stopped, cache, *on)
    subprocess.run([*cmd, "trainer.max_steps=4"], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    subprocess.run([*cmd, "ckpt_path=last"], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    assert_same_run(reference, stopped)


@pytest.mark.parametrize("threads", [1, 2])
def test_encode_micro_batches_on_the_cpu_and_encodes_each_caption_once(tmp_path, monkeypatch, threads):
    """Issue 28: the cache build runs the VAE on CPU-sized micro-batches (same rows to fp32 rounding) and the text
    encoder once per distinct caption (the same contexts bit for bit as one call on the whole batch), the calls one
    after another or side by side in threads (the same rows bit for bit)."""
    from ldm.models.text_encoder import CLIPTextEncoder
    from ldm.training.run import latent_prep

    assert latent_prep.micro_batch(torch.device("cpu"), 64 * 64, 64) == 8  # SD at 64 px: 8 images a call
    assert latent_prep.micro_batch(torch.device("cpu"), 512 * 512, 64) == 1
    assert latent_prep.micro_batch(torch.device("cpu"), 16 * 16, 5) == 5
    assert latent_prep.micro_batch(torch.device("cuda"), 64 * 64, 64) == 64  # a GPU: the whole batch ...
    assert latent_prep.micro_batch(torch.device("cuda"), 512 * 512, 64) == 8  # ... within its memory
    assert latent_prep.micro_batch(torch.device("cuda"), 1024 * 1024, 64) == 2

    torch.manual_seed(0)
    vae = AutoencoderKL.from_preset("tiny").eval()
    text = CLIPTextEncoder.from_tiny("tiny", folder=tmp_path / "clip").eval().requires_grad_(False)
    calls = {"vae": [], "text": [], "threads": set()}
    vae_encode, encode_ids, text_forward = vae.encode, text.encode_ids, text.forward

    def record(kind, fn, n):
        def wrapped(x):
            calls[kind].append(n(x))
            calls["threads"].add(threading.get_ident())
            return fn(x)
        return wrapped

    monkeypatch.setattr(vae, "encode", record("vae", vae_encode, len))
    monkeypatch.setattr(text, "encode_ids", record("text", encode_ids, len))
    monkeypatch.setattr(latent_prep, "CPU_ENCODE_PIXELS", 3 * 16 * 16)  # 3 images of 16 px a call
    monkeypatch.setattr(latent_prep, "CPU_TEXT_BATCH", 2)
    monkeypatch.setattr(latent_prep, "encode_threads", lambda device: threads)
    images = torch.rand(7, 3, 16, 16) * 2 - 1
    captions = ["a cat", "a cat", "a dog", "a cow", "a dog", "a bird", "a cat"]
    rows = latent_prep.make_encode(vae, text, "posterior")(images, captions)
    assert sorted(calls["vae"]) == [1, 3, 3]
    assert calls["text"] == [2, 2]  # the 4 distinct captions once, 2 a call
    assert len(calls["threads"]) <= threads and (threads == 1 or threading.get_ident() not in calls["threads"])
    with torch.no_grad():
        whole = vae_encode(images)
        contexts = text_forward(captions)
    torch.testing.assert_close(rows["mean"], whole.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows["logvar"], whole.logvar, atol=1e-5, rtol=1e-5)
    assert torch.equal(rows["context"], contexts)
    assert torch.equal(rows["context"][0], rows["context"][6])
    assert not torch.equal(rows["context"][0], rows["context"][2])
    monkeypatch.setattr(latent_prep, "encode_threads", lambda device: 1)
    one_by_one = latent_prep.make_encode(vae, text, "posterior")(images, captions)
    assert all(torch.equal(rows[k], one_by_one[k]) for k in rows), "threads change no bit"


def test_an_encoder_that_memoises_its_contexts_is_called_by_one_thread(tmp_path, monkeypatch):
    """A text encoder that memoises contexts (cache_size > 0) is not shared between threads: its calls are one
    task; the VAE's slices still run beside it."""
    from ldm.models.text_encoder import CLIPTextEncoder
    from ldm.training.run import latent_prep

    text = CLIPTextEncoder.from_tiny("tiny", folder=tmp_path / "clip", cache_size=8).eval().requires_grad_(False)
    seen = []
    forward = text.forward
    monkeypatch.setattr(text, "forward", lambda p: seen.append((threading.get_ident(), list(p))) or forward(p))
    monkeypatch.setattr(latent_prep, "CPU_TEXT_BATCH", 2)
    tasks, rows = latent_prep.caption_tasks(text, ["a", "b", "a", "c"], torch.device("cpu"))
    assert len(tasks) == 1 and rows == [0, 1, 0, 2]
    (contexts,) = latent_prep.run_side_by_side(tasks, 2)
    assert [p for _, p in seen] == [["a", "b"], ["c"]] and len({t for t, _ in seen}) == 1
    assert torch.equal(contexts, forward(["a", "b", "c"]))
