"""Latent + text-context cache: written once, resumed after an interruption, read back as the VAE's latents."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from ldm.data.cached_latents import CachedLatentsDataset
from ldm.cli.latent_cache import main
from ldm.data.latent_cache import MANIFEST, LatentCacheError, build_latent_cache, read_manifest, shard_name
from ldm.tasks.shapes.dataset import ShapesDataset
from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussian

N, RES, SHARD = 10, 16, 4  # 3 shards: 4 + 4 + 2 samples; tiny VAE (f=2) -> (4, 8, 8) latents
CTX = (5, 6)


def text_encoder(captions: list[str]) -> torch.Tensor:
    """A deterministic stand-in for CLIP: list[str] -> (B, 5, 6), a function of each caption alone."""
    rows = [torch.randn(CTX, generator=torch.Generator().manual_seed(zlib.crc32(c.encode()))) for c in captions]
    return torch.stack(rows)


class CountingVAE(torch.nn.Module):
    """Our VAE, counting encoded images and failing after `fail_after` encode calls (a simulated kill)."""

    def __init__(self, vae, fail_after=None):
        super().__init__()
        self.vae, self.fail_after = vae, fail_after
        self.images = self.calls = 0
        self.scaling_factor, self.shift_factor = vae.scaling_factor, vae.shift_factor

    def encode(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.images += x.shape[0]
        return self.vae.encode(x)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL.from_preset("tiny", scaling_factor=0.5, shift_factor=0.1).eval()


@pytest.fixture(scope="module")
def source():
    return ShapesDataset(size=N, resolution=RES, seed=3)


def images(source, indices):
    return torch.stack([source[i]["image"] for i in indices])


def shard_contents(path):
    """Tensors and metadata of a shard file (metadata key order is not stable, so bytes are not compared)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def build(source, out, vae, **kwargs):
    options = dict(shard_size=SHARD, batch_size=3, progress=False)
    return build_latent_cache(source, out, vae, kwargs.pop("text_encoder", text_encoder), **{**options, **kwargs})


def test_cache_written_with_manifest(tmp_path, source, vae):
    manifest = build(source, tmp_path, vae)
    assert manifest == read_manifest(tmp_path)
    assert manifest["complete"] and manifest["num_samples"] == N
    assert manifest["store"] == "posterior" and manifest["text"] == "context"
    assert manifest["latent_shape"] == [4, RES // 2, RES // 2] and manifest["context_shape"] == list(CTX)
    assert (manifest["scaling_factor"], manifest["shift_factor"]) == (0.5, 0.1)
    assert [(s["file"], s["start"], s["count"]) for s in manifest["shards"]] == [
        (shard_name(0), 0, 4), (shard_name(1), 4, 4), (shard_name(2), 8, 2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST] + [shard_name(k) for k in range(3)]


def test_dataset_returns_the_vae_latents(tmp_path, source, vae):
    build(source, tmp_path, vae)
    x = images(source, range(N))
    with torch.no_grad():
        expected_mode = vae.encode_latents(x, sample=False)  # (N, 4, 8, 8)
        posterior = vae.encode(x)
    mode = CachedLatentsDataset(tmp_path, sample=False)
    sampled = CachedLatentsDataset(tmp_path, seed=7)
    assert len(mode) == len(sampled) == N
    for i in range(N):
        item = mode[i]
        assert set(item) == {"latents", "context", "caption", "index"}
        assert item["latents"].shape == (4, 8, 8) and item["latents"].dtype == torch.float32
        assert item["context"].shape == CTX and item["context"].dtype == torch.float32
        assert item["caption"] == source[i]["caption"] and item["index"] == i
        torch.testing.assert_close(item["latents"], expected_mode[i], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(item["context"], text_encoder([source[i]["caption"]])[0])
        # a posterior draw: exactly the VAE's DiagonalGaussian.sample with the dataset's per-index generator
        one = DiagonalGaussian(posterior.moments[i : i + 1])
        expected = (one.sample(sampled.generator(i))[0] - 0.1) * 0.5
        torch.testing.assert_close(sampled[i]["latents"], expected, atol=1e-6, rtol=1e-6)
    assert mode[-1]["index"] == N - 1
    with pytest.raises(IndexError):
        mode[N]


def test_posterior_draws_per_index_and_epoch(tmp_path, source, vae):
    build(source, tmp_path, vae)
    data = CachedLatentsDataset(tmp_path)
    a = data[2]["latents"]
    torch.testing.assert_close(data[2]["latents"], a)  # same index, same epoch: same draw
    assert (data[3]["latents"] - a).abs().max() > 1e-3
    data.set_epoch(1)
    assert (data[2]["latents"] - a).abs().max() > 1e-4  # a new draw each epoch
    mean = CachedLatentsDataset(tmp_path, sample=False)[2]["latents"]
    assert (a - mean).abs().max() > 1e-4


def test_resume_after_lost_last_shard(tmp_path, source, vae):
    """A run killed before the last shard was recorded: only that shard is encoded again."""
    build(source, tmp_path, vae)
    before = [shard_contents(tmp_path / shard_name(k)) for k in range(3)]
    stamps = {k: (tmp_path / shard_name(k)).stat().st_mtime_ns for k in range(2)}
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["shards"] = manifest["shards"][:-1]
    manifest["complete"] = False
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / shard_name(2)).unlink()
    with pytest.raises(LatentCacheError, match="incomplete"):
        CachedLatentsDataset(tmp_path)
    assert len(CachedLatentsDataset(tmp_path, allow_incomplete=True)) == 8

    counting = CountingVAE(vae)
    resumed = build(source, tmp_path, counting)
    assert counting.images == 2  # the 2 samples of the last shard, nothing else
    assert resumed["complete"] and len(resumed["shards"]) == 3
    assert {k: (tmp_path / shard_name(k)).stat().st_mtime_ns for k in range(2)} == stamps
    for k in range(3):
        tensors, metadata = shard_contents(tmp_path / shard_name(k))
        assert metadata == before[k][1] and tensors.keys() == before[k][0].keys()
        for name in tensors:
            torch.testing.assert_close(tensors[name], before[k][0][name], atol=0, rtol=0)


def test_resume_after_kill_mid_run(tmp_path, source, vae):
    killed = CountingVAE(vae, fail_after=3)  # batches of 3 within shards of 4: dies in the 2nd shard
    with pytest.raises(KeyboardInterrupt):
        build(source, tmp_path, killed)
    partial = read_manifest(tmp_path)
    assert not partial["complete"] and [s["start"] for s in partial["shards"]] == [0]
    assert not (tmp_path / shard_name(1)).exists()
    counting = CountingVAE(vae)
    build(source, tmp_path, counting)
    assert counting.images == N - SHARD
    with torch.no_grad():
        expected = vae.encode_latents(images(source, range(N)), sample=False)
    data = CachedLatentsDataset(tmp_path, sample=False)
    torch.testing.assert_close(torch.stack([data[i]["latents"] for i in range(N)]), expected, atol=1e-6, rtol=1e-6)


def test_resume_with_other_settings_is_refused(tmp_path, source, vae):
    build(source, tmp_path, vae)
    with pytest.raises(LatentCacheError, match="other settings.*shard_size"):
        build(source, tmp_path, vae, shard_size=5)
    build(source, tmp_path, vae, shard_size=5, overwrite=True)
    assert [s["count"] for s in read_manifest(tmp_path)["shards"]] == [5, 5]
    assert not (tmp_path / shard_name(2)).exists()  # overwrite removed the old shards


@pytest.mark.parametrize("store", ["sample", "mode"])
def test_store_one_latent(tmp_path, source, vae, store):
    build(source, tmp_path, vae, store=store, shard_size=5, batch_size=5, dtype="float16", seed=4)
    data = CachedLatentsDataset(tmp_path)
    assert data.store == store and not data.sample
    x = images(source, range(5))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(4 * 1_000_003 + 0)  # the seed of shard 0
        expected = vae.encode_latents(x, sample=store == "sample", generator=generator)
    got = torch.stack([data[i]["latents"] for i in range(5)])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)  # stored as float16
    torch.testing.assert_close(data[1]["latents"], data[1]["latents"])


def test_captions_only(tmp_path, source, vae):
    manifest = build(source, tmp_path, vae, text_encoder=None)
    assert manifest["text"] == "caption" and manifest["context_shape"] is None
    item = CachedLatentsDataset(tmp_path)[4]
    assert set(item) == {"latents", "caption", "index"} and item["caption"] == source[4]["caption"]
    with pytest.raises(ValueError, match="text_encoder"):
        build(source, tmp_path / "x", vae, text_encoder=None, text="context")


def test_dataloader_workers_and_batches(tmp_path, source, vae):
    build(source, tmp_path, vae)
    data = CachedLatentsDataset(tmp_path)
    serial = next(iter(DataLoader(data, batch_size=N)))
    parallel = torch.cat([b["latents"] for b in DataLoader(data, batch_size=3, num_workers=2)])
    assert serial["latents"].shape == (N, 4, 8, 8) and serial["context"].shape == (N, *CTX)
    assert serial["caption"] == [source[i]["caption"] for i in range(N)]
    torch.testing.assert_close(parallel, serial["latents"])  # workers draw the same latents


class Stream(IterableDataset):
    def __init__(self, source):
        self.source = source

    def __iter__(self):
        return (self.source[i] for i in range(len(self.source)))


def test_iterable_source_and_resume(tmp_path, source, vae):
    manifest = build(Stream(source), tmp_path, vae)
    assert manifest["complete"] and manifest["num_samples"] == N and len(manifest["shards"]) == 3
    reference = CachedLatentsDataset(tmp_path, sample=False)
    expected = [reference[i] for i in range(N)]
    manifest["shards"] = manifest["shards"][:1]
    manifest["complete"] = False
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    counting = CountingVAE(vae)
    build(Stream(source), tmp_path, counting)
    assert counting.images == N - SHARD  # the recorded first shard is skipped without encoding
    data = CachedLatentsDataset(tmp_path, sample=False)
    for i in range(N):
        torch.testing.assert_close(data[i]["latents"], expected[i]["latents"])
        assert data[i]["caption"] == expected[i]["caption"] == source[i]["caption"]
    limited = build(Stream(source), tmp_path / "limited", vae, max_samples=5)
    assert [s["count"] for s in limited["shards"]] == [4, 1]


def test_missing_and_corrupt_cache(tmp_path, source, vae):
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        CachedLatentsDataset(tmp_path / "nothing")
    build(source, tmp_path, vae)
    good = (tmp_path / MANIFEST).read_text()

    (tmp_path / MANIFEST).write_text(good[: len(good) // 2])  # truncated JSON
    with pytest.raises(LatentCacheError, match="corrupt.*--overwrite"):
        CachedLatentsDataset(tmp_path)
    with pytest.raises(LatentCacheError, match="corrupt"):
        build(source, tmp_path, vae)  # never resumes from a manifest it cannot read

    (tmp_path / MANIFEST).write_text(json.dumps({"format": "ldm-latent-cache", "version": 1, "shards": []}))
    with pytest.raises(LatentCacheError, match="corrupt: missing"):
        CachedLatentsDataset(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"hello": 1}))
    with pytest.raises(LatentCacheError, match="not a latent cache manifest"):
        CachedLatentsDataset(tmp_path)

    (tmp_path / MANIFEST).write_text(good)
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(LatentCacheError, match=shard_name(1) + " listed in the manifest is missing"):
        CachedLatentsDataset(tmp_path)
    build(source, tmp_path, vae)  # the build notices the missing shard and re-encodes it
    CachedLatentsDataset(tmp_path)

    data = (tmp_path / shard_name(2)).read_bytes()
    (tmp_path / shard_name(2)).write_bytes(data[: len(data) // 2])  # truncated shard
    with pytest.raises(LatentCacheError, match="unreadable"):
        CachedLatentsDataset(tmp_path)[9]


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--store" in capsys.readouterr().out
    out = tmp_path / "cache"
    args = [str(out), "--source", "shapes", "--size", "6", "--resolution", "16", "--vae-preset", "tiny",
            "--shard-size", "4", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    manifest = main(args)
    assert manifest["complete"] and manifest["num_samples"] == 6 and manifest["text"] == "caption"
    assert manifest["description"]["source"] == "shapes"
    assert len(CachedLatentsDataset(out)) == 6
    main(args)  # a second run finds everything done
    assert len(read_manifest(out)["shards"]) == 2


@pytest.mark.parametrize("iterable", [False, True])
def test_stored_samples_draw_fresh_noise_per_sample(tmp_path, source, vae, iterable):
    """store="sample": one noise stream per shard, continued across batches (never restarted per batch)."""
    build(Stream(source) if iterable else source, tmp_path, vae, store="sample", text_encoder=None)
    with torch.no_grad():
        posterior = vae.encode(images(source, range(N)))
    data = CachedLatentsDataset(tmp_path)
    latents = torch.stack([data[i]["latents"] for i in range(N)])
    eps = (latents / 0.5 + 0.1 - posterior.mean) / posterior.std  # the standard normal draw of each sample
    assert eps.flatten(1).std(1).sub(1).abs().max() < 0.3
    for i in range(N):
        for j in range(i):
            assert (eps[i] - eps[j]).abs().max() > 0.5, (i, j)


def test_command_line_loads_vae_weights(tmp_path, source, vae):
    """--vae-weights: our own VAE safetensors (an SD single file's first_stage_model.* works the same way)."""
    from safetensors.torch import save_file

    save_file({"first_stage_model." + k: v.contiguous() for k, v in vae.state_dict().items()}
              | {"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(tmp_path / "sd.safetensors"))
    out = tmp_path / "cache"
    main([str(out), "--source", "shapes", "--size", "3", "--resolution", str(RES), "--seed", "3",
          "--vae-preset", "tiny", "--vae-weights", str(tmp_path / "sd.safetensors"), "--store", "mode",
          "--device", "cpu", "--no-progress"])
    data = CachedLatentsDataset(out)
    with torch.no_grad():
        expected = vae.encode(images(source, range(3))).mean * 0.18215  # the preset's scaling factor
    torch.testing.assert_close(torch.stack([data[i]["latents"] for i in range(3)]), expected, atol=1e-6, rtol=1e-6)
