import json
import logging
from collections import Counter

import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from ldm.data.collate import collate_image_caption
from ldm.data.webdataset import WebDatasetSource


def write_shards(folder, images, n_shards=4, per_shard=3):
    """Shards shards-000.tar.. with even samples captioned in .txt and odd ones in .json."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"shards-{s:03d}.tar")) as sink:
            for j in range(per_shard):
                key = f"s{s}_{j}"
                sample = {"__key__": key, "png": images.bytes(size=(20, 16))}
                if j % 2 == 0:
                    sample["txt"] = f"caption {key}"
                else:
                    sample["json"] = json.dumps({"caption": f"caption {key}", "width": 20})
                sink.write(sample)
    return str(folder / f"shards-{{000..{n_shards - 1:03d}}}.tar")


def all_keys(n_shards=4, per_shard=3):
    return {f"s{s}_{j}" for s in range(n_shards) for j in range(per_shard)}


def test_brace_pattern_txt_and_json_captions(tmp_path, images):
    pattern = write_shards(tmp_path, images)
    source = WebDatasetSource(pattern, resolution=8, shuffle_buffer=0)
    assert len(source.urls) == 4
    samples = list(source)
    assert {s["key"] for s in samples} == all_keys()
    assert all(s["caption"] == f"caption {s['key']}" for s in samples)
    assert samples[0]["image"].shape == (3, 8, 8)
    assert not hasattr(source, "__len__")


def test_shuffle_buffer_is_seeded(tmp_path, images):
    pattern = write_shards(tmp_path, images)
    order = lambda seed: [s["key"] for s in WebDatasetSource(pattern, resolution=8, shuffle_buffer=50, seed=seed)]
    assert order(1) == order(1)
    assert order(1) != order(2)
    assert set(order(1)) == all_keys()


def test_split_by_worker_covers_each_sample_once(tmp_path, images):
    pattern = write_shards(tmp_path, images)
    source = WebDatasetSource(pattern, resolution=8, shuffle_buffer=10)
    loader = DataLoader(source, batch_size=2, num_workers=2, collate_fn=collate_image_caption)
    counts = Counter(k for batch in loader for k in batch["key"])
    assert set(counts) == all_keys() and set(counts.values()) == {1}


def test_split_by_node(tmp_path, images, monkeypatch):
    pattern = write_shards(tmp_path, images)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({s["key"] for s in WebDatasetSource(pattern, resolution=8, shuffle_buffer=0)})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == all_keys()


def test_epoch_size_and_resampling(tmp_path, images):
    pattern = write_shards(tmp_path, images, n_shards=2)
    repeated = [s["key"] for s in WebDatasetSource(pattern, resolution=8, epoch_size=15)]
    assert len(repeated) == 15 and set(repeated) == all_keys(n_shards=2)
    resampled = WebDatasetSource(pattern, resolution=8, resampled=True, epoch_size=7, shuffle_buffer=0)
    assert len(list(resampled)) == 7
    loader = DataLoader(WebDatasetSource(pattern, resolution=8, epoch_size=9), batch_size=None, num_workers=2)
    assert len(list(loader)) == 9  # epoch_size is per rank, shared between workers


def test_bad_samples_and_shards_are_skipped(tmp_path, images, caplog):
    good = write_shards(tmp_path, images, n_shards=1)
    with wds.TarWriter(str(tmp_path / "broken.tar")) as sink:
        sink.write({"__key__": "bad_image", "png": b"not a png", "txt": "x"})
        sink.write({"__key__": "no_image", "txt": "caption only"})
        sink.write({"__key__": "fine", "png": images.bytes(), "txt": "ok"})
    (tmp_path / "garbage.tar").write_bytes(b"\x00garbage" * 100)
    urls = [good.replace("{000..000}", "000"), str(tmp_path / "broken.tar"), str(tmp_path / "garbage.tar")]
    source = WebDatasetSource(urls, resolution=8, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        keys = [s["key"] for s in source]
    assert set(keys) == all_keys(n_shards=1) | {"fine"}
    assert any(name.endswith("broken.tar:bad_image") for name in source.bad_samples)
    assert any(name.endswith("broken.tar:no_image") for name in source.bad_samples)
    assert any(name.endswith("garbage.tar") for name in source.bad_samples)
    assert source.errors >= 3
    assert "bad_image" in caplog.text


def test_missing_caption_counts(tmp_path, images):
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "k", "jpg": images.bytes(fmt="JPEG"), "json": json.dumps({"other": 1})})
    source = WebDatasetSource(str(tmp_path / "a.tar"), resolution=8)
    assert [s["caption"] for s in source] == [""]
    assert source.missing_captions == 1


def test_no_urls():
    with pytest.raises(ValueError, match="no shards"):
        WebDatasetSource([], resolution=8)


def test_unreadable_or_too_few_shards_do_not_hang(tmp_path, images):
    (tmp_path / "garbage.tar").write_bytes(b"\x00garbage" * 100)
    assert list(WebDatasetSource(str(tmp_path / "garbage.tar"), resolution=8, epoch_size=5)) == []
    with pytest.raises(RuntimeError, match="no readable samples"):
        list(WebDatasetSource(str(tmp_path / "garbage.tar"), resolution=8, epoch_size=5, resampled=True))
    one = write_shards(tmp_path / "one", images, n_shards=1).replace("{000..000}", "000")
    loader = DataLoader(WebDatasetSource(one, resolution=8, epoch_size=4), batch_size=None, num_workers=2)
    assert len(list(loader)) == 2  # worker 0 stops at its share; worker 1 has no shard
