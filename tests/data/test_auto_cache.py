"""The automatic latent cache (ldm.data.auto_cache): reused when nothing changed (no encoder call), an image that
changed is encoded again, added images are encoded alone, removed ones are dropped, a flip is cached both ways."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from ldm.data.auto_cache import cache_spec, sync_cache
from ldm.data.image_folder import ImageFolderDataset
from tests.helpers.data import CountingEncoder


def write_folder(root, images, n, start=0):
    for i in range(start, start + n):
        images.save(root / f"{i:03d}.png", size=(8, 8), color=(20 * i, 100, 200 - 10 * i))
        (root / f"{i:03d}.txt").write_text(f"image {i}")


def sync(root, folder, encoder, **kwargs):
    ds = ImageFolderDataset(root, resolution=8, **kwargs)
    return ds, sync_cache(folder, cache_spec(ds), encoder, batch_size=4, progress=False, sample=False)


def expected_latent(ds, i, flip=False):
    image = ds[i]["image"] if not flip else ds[i]["image"].flip(-1)
    return F.avg_pool2d(image[None], 2)[0]


def test_reused_with_no_encoder_call_when_nothing_changed(tmp_path, images):
    root, folder = tmp_path / "images", tmp_path / "cache"
    write_folder(root, images, 6)
    enc = CountingEncoder()
    ds, view = sync(root, folder, enc)
    assert enc.images == 6 and view.encoded == 6 and len(view) == 6
    for i in range(6):
        torch.testing.assert_close(view[i]["latents"], expected_latent(ds, i))
        assert view[i]["caption"] == f"image {i}" and view[i]["index"] == i
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}

    again = CountingEncoder()
    _, view = sync(root, folder, again)
    assert again.calls == 0 and view.encoded == 0 and len(view) == 6
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")} == before


def test_a_changed_image_is_encoded_again_and_only_it(tmp_path, images):
    root, folder = tmp_path / "images", tmp_path / "cache"
    write_folder(root, images, 5)
    sync(root, folder, CountingEncoder())
    images.save(root / "002.png", size=(8, 8), color=(0, 255, 0))  # new content (and mtime)
    enc = CountingEncoder()
    ds, view = sync(root, folder, enc)
    assert enc.images == 1
    torch.testing.assert_close(view[2]["latents"], expected_latent(ds, 2))
    assert view[2]["latents"][1].mean() > 0.8, "the new, green image is read, not the stale one"

    stat = (root / "004.png").stat()  # same bytes, another mtime: re-encoded (the key is path, size and mtime)
    os.utime(root / "004.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    enc = CountingEncoder()
    sync(root, folder, enc)
    assert enc.images == 1

    (root / "001.txt").write_text("a new caption")  # the cached text context depends on it
    enc = CountingEncoder()
    _, view = sync(root, folder, enc)
    assert enc.images == 1 and view[1]["caption"] == "a new caption"


def test_added_images_are_encoded_alone_and_removed_ones_dropped(tmp_path, images):
    root, folder = tmp_path / "images", tmp_path / "cache"
    write_folder(root, images, 4)
    sync(root, folder, CountingEncoder())
    write_folder(root, images, 3, start=4)
    enc = CountingEncoder()
    ds, view = sync(root, folder, enc)
    assert enc.images == 3 and len(view) == 7 and len(list(folder.glob("part-*"))) == 2
    for i in range(7):
        torch.testing.assert_close(view[i]["latents"], expected_latent(ds, i))

    for i in range(4, 7):  # every row of the second part unused: it is deleted
        (root / f"{i:03d}.png").unlink()
        (root / f"{i:03d}.txt").unlink()
    enc = CountingEncoder()
    _, view = sync(root, folder, enc)
    assert enc.calls == 0 and len(view) == 4 and [p.name for p in folder.glob("part-*")] == ["part-00000"]


def test_random_flip_is_cached_as_both_variants(tmp_path, images):
    root, folder = tmp_path / "images", tmp_path / "cache"
    write_folder(root, images, 8)
    enc = CountingEncoder()
    ds, view = sync(root, folder, enc, random_flip=True)
    assert enc.images == 16 and len(view) == 8
    plain = ImageFolderDataset(root, resolution=8)
    seen = set()
    for epoch in range(4):
        view.set_epoch(epoch)
        for i in range(8):
            got = view[i]["latents"]
            flipped = torch.allclose(got, expected_latent(plain, i, flip=True))
            assert flipped or torch.allclose(got, expected_latent(plain, i))
            torch.testing.assert_close(view[i]["latents"], got)  # the same choice for the same (epoch, index)
            seen.add(flipped)
    assert seen == {True, False}

    enc = CountingEncoder()  # turning the flip off reuses the unflipped rows
    sync(root, folder, enc)
    assert enc.calls == 0


def test_random_crop_is_refused_with_the_fix(tmp_path, images):
    root = tmp_path / "images"
    write_folder(root, images, 2)
    with pytest.raises(ValueError, match="center_crop=true"):
        sync(root, tmp_path / "cache", CountingEncoder(), center_crop=False)


def test_an_interrupted_part_is_finished_not_restarted(tmp_path, images):
    root, folder = tmp_path / "images", tmp_path / "cache"
    write_folder(root, images, 6)
    ds = ImageFolderDataset(root, resolution=8)
    spec = cache_spec(ds)

    class Killed(Exception):
        pass

    enc = CountingEncoder()

    def dies_after_the_first_shard(images, captions, generator=None):
        if enc.calls == 1:
            raise Killed
        return enc(images, captions)

    from ldm.data import latent_cache

    original = latent_cache.build_latent_cache

    def small_shards(*args, **kwargs):
        return original(*args, **{**kwargs, "shard_size": 4, "batch_size": 4})

    import ldm.data.auto_cache as auto

    auto.build_latent_cache = small_shards
    try:
        with pytest.raises(Killed):
            sync_cache(folder, spec, dies_after_the_first_shard, progress=False)
        enc2 = CountingEncoder()
        view = sync_cache(folder, spec, enc2, progress=False, sample=False)
    finally:
        auto.build_latent_cache = original
    assert enc2.images == 2, "the finished shard of 4 is kept, the last 2 images are encoded"
    for i in range(6):
        torch.testing.assert_close(view[i]["latents"], expected_latent(ds, i))
    assert json.loads((folder / "part-00000" / "manifest.json").read_text())["complete"]


def test_a_webdataset_stream_is_cached_whole_and_rebuilt_when_a_shard_changes(tmp_path, images):
    import io
    import tarfile

    from ldm.data.webdataset import WebDatasetSource

    def write_shard(path, n, color):
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                for suffix, data in (("png", images.bytes(size=(8, 8), color=color)), ("txt", f"s{i}".encode())):
                    info = tarfile.TarInfo(f"{i:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    shard = tmp_path / "shard-0.tar"
    write_shard(shard, 5, (255, 0, 0))
    ds = WebDatasetSource(str(shard), resolution=8, shuffle_buffer=10, random_flip=True)
    enc = CountingEncoder()
    view = sync_cache(tmp_path / "c" / "a", cache_spec(ds), enc, progress=False)
    assert enc.images == 10 and len(view) == 5 and [view[i]["caption"] for i in range(5)] == [f"s{i}" for i in range(5)]
    enc = CountingEncoder()
    sync_cache(tmp_path / "c" / "a", cache_spec(ds), enc, progress=False)
    assert enc.calls == 0
    a = cache_spec(ds).settings
    write_shard(shard, 6, (0, 0, 255))
    assert cache_spec(WebDatasetSource(str(shard), resolution=8)).settings != a, "the cache folder key changes"


def test_loader_workers_build_the_same_cache_as_the_main_process(tmp_path, images):
    """Issue 28: DataLoader workers decode the next images while the encoder runs; the cache is the same bytes."""
    from safetensors.torch import load_file

    root = tmp_path / "images"
    write_folder(root, images, 10)
    ds = ImageFolderDataset(root, resolution=8, random_flip=True)
    shards = {}
    for workers in (0, 2):
        enc = CountingEncoder()
        view = sync_cache(tmp_path / f"cache{workers}", cache_spec(ds), enc, batch_size=3, num_workers=workers,
                          progress=False, sample=False)
        assert enc.images == 20 and view.encoded == 20  # every image, both flips, once
        files = sorted((tmp_path / f"cache{workers}").rglob("shard-*.safetensors"))
        shards[workers] = [load_file(f) for f in files]
        rows = json.loads((files[0].parent / "rows.json").read_text())
        assert [r[1] for r in rows[:4]] == [False, True, False, True]
    assert len(shards[0]) == len(shards[2]) == 1
    assert shards[0][0].keys() == shards[2][0].keys()
    for name in shards[0][0]:
        assert torch.equal(shards[0][0][name], shards[2][0][name]), name
