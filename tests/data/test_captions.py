"""Caption options (ldm.data.captions) in kohya's order, seeded per (seed, epoch, index); their hooks in the image
folder (sidecar extension, per-epoch draws) and in the automatic latent cache (random options are applied on read,
deterministic ones are cached and keyed)."""

import pickle
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from ldm.data.auto_cache import cache_spec, contexts_cacheable, sync_cache
from ldm.data.captions import CaptionProcessor, expand_wildcards, split_tags
from ldm.data.image_folder import ImageFolderDataset

TAGS = "sks, red, green, blue, yellow, cyan, pink"


def outputs(processor, caption, n=200, epoch=0):
    return [processor(caption, index=i, epoch=epoch) for i in range(n)]


def test_defaults_change_nothing():
    p = CaptionProcessor()
    assert p.is_identity and not p.is_random
    assert p("a, b,  c\nsecond line", 3) == "a, b,  c\nsecond line"


def test_prefix_and_suffix_join_with_a_space_as_kohya():
    p = CaptionProcessor(prefix="photo of sks,", suffix="masterpiece")
    assert p("dog, grass", 0) == "photo of sks, dog, grass masterpiece"
    assert not p.is_random and not p.is_identity


def test_wildcards_pick_each_option_and_keep_escaped_braces():
    p = CaptionProcessor(wildcards=True)
    seen = Counter(outputs(p, "a {red|green|blue} circle {{literal}}"))
    assert set(seen) == {f"a {c} circle {{literal}}" for c in ("red", "green", "blue")}
    assert min(seen.values()) > 30  # ~uniform over 200 draws (each option ~67)


def test_wildcards_pick_one_line_of_a_multi_line_caption():
    p = CaptionProcessor(wildcards=True)
    assert set(outputs(p, "first caption\nsecond caption", n=50)) == {"first caption", "second caption"}
    assert expand_wildcards("{only}", __import__("random").Random(0)) == "only"


def test_prefix_comes_before_wildcards_and_shuffle():
    """kohya's order: prefix/suffix first, so a prefix may hold wildcards and its tags take part in keep_tokens."""
    p = CaptionProcessor(prefix="{cat|dog},", wildcards=True, shuffle=True, keep_tokens=1)
    for out in outputs(p, "red, green, blue", n=40):
        head, *rest = out.split(", ")
        assert head in ("cat", "dog") and sorted(rest) == ["blue", "green", "red"]


def test_shuffle_keeps_the_first_tokens_and_permutes_the_rest():
    p = CaptionProcessor(shuffle=True, keep_tokens=2)
    outs = outputs(p, TAGS)
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "red"] and sorted(tags[2:]) == sorted(TAGS.split(", ")[2:])
    assert len(set(outs)) > 50  # 5! = 120 orders


def test_keep_tokens_alone_changes_nothing_as_in_kohya():
    assert CaptionProcessor(keep_tokens=2)(TAGS, 0) == TAGS


def test_keep_tokens_separator_fixes_head_and_tail():
    p = CaptionProcessor(shuffle=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "sks, girl ||| red, green, blue, cyan ||| best quality, 8k"
    outs = outputs(p, caption)
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "girl"] and tags[-2:] == ["best quality", "8k"]
        assert sorted(tags[2:-2]) == ["blue", "cyan", "green", "red"]
    assert len(set(outs)) == 24
    # without the separator in a caption, keep_tokens applies
    assert split_tags("a, b, c", ",", 1, "|||") == (["a"], ["b", "c"], [])


def test_tag_dropout_drops_only_the_flexible_tags_at_its_rate():
    p = CaptionProcessor(tag_dropout=0.3, keep_tokens=1)
    flexible = TAGS.split(", ")[1:]
    kept = 0
    for out in outputs(p, TAGS, n=400):
        tags = out.split(", ") if out else []
        assert tags[0] == "sks"
        assert tags[1:] == [t for t in flexible if t in tags[1:]]  # order kept without shuffle
        kept += len(tags) - 1
    rate = 1 - kept / (400 * len(flexible))
    assert 0.25 < rate < 0.35
    assert CaptionProcessor(tag_dropout=1.0, keep_tokens=1)(TAGS, 0) == "sks"


def test_other_separator_rejoins_with_it():
    p = CaptionProcessor(separator=";", shuffle=True)
    for out in outputs(p, "a; b; c", n=20):
        assert sorted(out.split("; ")) == ["a", "b", "c"]


def test_seeded_per_sample_not_by_global_state():
    p = CaptionProcessor(shuffle=True, tag_dropout=0.2, wildcards=True, seed=7)
    caption = "{x|y}, " + TAGS
    first = outputs(p, caption, n=30, epoch=3)
    torch.manual_seed(123)
    __import__("random").seed(5)
    assert outputs(CaptionProcessor(shuffle=True, tag_dropout=0.2, wildcards=True, seed=7), caption, 30, 3) == first
    assert outputs(pickle.loads(pickle.dumps(p)), caption, 30, 3) == first  # a DataLoader worker's copy
    assert outputs(p, caption, n=30, epoch=4) != first
    assert outputs(CaptionProcessor(shuffle=True, tag_dropout=0.2, wildcards=True, seed=8), caption, 30, 3) != first


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match=r"data.train.captions: unknown key\(s\) \['shufle'\]"):
        CaptionProcessor.of({"shufle": True})
    with pytest.raises(ValueError, match="data.train.captions.tag_dropout"):
        CaptionProcessor.of({"tag_dropout": 1.5})
    with pytest.raises(ValueError, match="data.train.captions.keep_tokens"):
        CaptionProcessor(keep_tokens=-1)
    with pytest.raises(ValueError, match="data.train.captions.separator"):
        CaptionProcessor(separator="")
    assert CaptionProcessor.of({"extension": "caption"}).extension == ".caption"


# ---------------------------------------------------------------------------------------------- image folder


def write_folder(root, images, n, ext=".txt", caption="red, green, blue, cyan"):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        images.save(root / f"{i:03d}.png", size=(8, 8), color=(20 * i, 100, 200 - 10 * i))
        (root / f"{i:03d}{ext}").write_text(f"img{i}, {caption}")


def test_image_folder_reads_the_configured_caption_extension(tmp_path, images):
    write_folder(tmp_path, images, 2, ext=".caption")
    (tmp_path / "000.txt").write_text("the txt sidecar")
    ds = ImageFolderDataset(tmp_path, resolution=8, captions={"extension": ".caption"})
    assert ds[0]["caption"].startswith("img0, red") and ds.missing_captions == 0
    assert ImageFolderDataset(tmp_path, resolution=8)[0]["caption"] == "the txt sidecar"


def test_image_folder_shuffles_per_epoch_and_index(tmp_path, images):
    write_folder(tmp_path, images, 3)
    options = {"shuffle": True, "keep_tokens": 1, "prefix": "sks,", "seed": 1}
    ds = ImageFolderDataset(tmp_path, resolution=8, captions=options)
    p = CaptionProcessor.of(options)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(3):
            raw = ds.captions[i]
            assert ds[i]["caption"] == p(raw, i, epoch)
            tags = ds[i]["caption"].split(", ")
            assert tags[0] == "sks" and sorted(tags[1:]) == sorted(raw.split(", "))
    ds.set_epoch(0)
    first = [ds[i]["caption"] for i in range(3)]
    ds.set_epoch(1)
    assert [ds[i]["caption"] for i in range(3)] != first


# ---------------------------------------------------------------------------------------------- latent cache


class Encoder:
    def __init__(self):
        self.captions = []

    def __call__(self, images, captions, generator=None):
        self.captions += list(captions)
        mean = F.avg_pool2d(images, 2)
        return {"mean": mean, "logvar": torch.full_like(mean, -30.0)}


def test_random_options_cache_raw_captions_and_apply_on_read(tmp_path, images):
    root = tmp_path / "images"
    write_folder(root, images, 4)
    options = {"shuffle": True, "tag_dropout": 0.25, "keep_tokens": 1, "seed": 3}
    ds = ImageFolderDataset(root, resolution=8, captions=options)
    spec = cache_spec(ds)
    assert not contexts_cacheable(spec)  # latent_prep then caches no text contexts
    enc = Encoder()
    view = sync_cache(tmp_path / "cache", spec, enc, batch_size=2, progress=False, sample=False)
    assert enc.captions == ds.captions  # the captions as read are cached
    for epoch in (0, 2):
        view.set_epoch(epoch)
        ds.set_epoch(epoch)
        assert [view[i]["caption"] for i in range(4)] == [ds[i]["caption"] for i in range(4)]
    assert ds.caption_options.is_random  # the dataset itself is untouched by cache_spec


def test_deterministic_options_are_cached_processed_and_keyed(tmp_path, images):
    root = tmp_path / "images"
    write_folder(root, images, 2)
    plain = cache_spec(ImageFolderDataset(root, resolution=8))
    prefixed = cache_spec(ImageFolderDataset(root, resolution=8, captions={"prefix": "sks,"}))
    other = cache_spec(ImageFolderDataset(root, resolution=8, captions={"prefix": "zzz,"}))
    assert contexts_cacheable(prefixed)
    assert len({str(sorted(s.settings.items())) for s in (plain, prefixed, other)}) == 3
    enc = Encoder()
    view = sync_cache(tmp_path / "cache", prefixed, enc, batch_size=2, progress=False, sample=False)
    assert enc.captions == [f"sks, img{i}, red, green, blue, cyan" for i in range(2)]
    assert view[1]["caption"] == "sks, img1, red, green, blue, cyan"


# ---------------------------------------------------------------------------------------------- hf, webdataset


def test_hf_dataset_and_webdataset_process_their_captions(tmp_path, images):
    import datasets
    import webdataset as wds

    from ldm.data.hf_dataset import HFDataset
    from ldm.data.webdataset import WebDatasetSource

    options = {"shuffle": True, "keep_tokens": 1, "suffix": "end", "seed": 2}
    p = CaptionProcessor.of(options)
    table = datasets.Dataset.from_dict({"image": [images.make(size=(8, 8)) for _ in range(3)],
                                        "text": [f"img{i}, a, b, c" for i in range(3)]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    hf = HFDataset(str(tmp_path / "hf"), resolution=8, captions=options)
    hf.set_epoch(5)
    assert [hf[i]["caption"] for i in range(3)] == [p(f"img{i}, a, b, c", i, 5) for i in range(3)]
    assert not contexts_cacheable(cache_spec(hf))

    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "png": images.bytes(size=(8, 8)), "txt": f"img{i}, a, b, c"})
    source = WebDatasetSource(str(tmp_path / "shard.tar"), resolution=8, shuffle_buffer=0, captions=options)
    source.set_epoch(1)
    assert {s["key"]: s["caption"] for s in source} == {f"k{i}": p(f"img{i}, a, b, c", f"k{i}", 1) for i in range(3)}
    for make in (lambda: HFDataset(str(tmp_path / "hf"), resolution=8, captions={"extension": ".caption"}),
                 lambda: WebDatasetSource(str(tmp_path / "shard.tar"), captions={"extension": ".caption"})):
        with pytest.raises(ValueError, match="captions.extension is for image folders"):
            make()


def test_persistent_workers_see_the_new_epoch(tmp_path, images):
    from torch.utils.data import DataLoader

    from ldm.data.collate import collate_image_caption

    root = tmp_path / "images"
    write_folder(root, images, 4)
    options = {"shuffle": True, "seed": 4}
    ds = ImageFolderDataset(root, resolution=8, captions=options)
    view = sync_cache(tmp_path / "cache", cache_spec(ds), Encoder(), batch_size=2, progress=False, sample=False)
    p = CaptionProcessor.of(options)
    for dataset in (ds, view):
        loader = DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True,
                            collate_fn=collate_image_caption)
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            (batch,) = list(loader)
            assert batch["caption"] == [p(ds.captions[i], i, epoch) for i in range(4)], (type(dataset), epoch)


def test_random_captions_and_buckets_together_through_the_cache(tmp_path, images):
    """Buckets (latents of several shapes, micro-conditioning records) and random caption options (applied on
    read) meet in the cached view: each item has its bucket's latent shape, its record and the epoch's caption."""
    root = tmp_path / "mixed"
    for i, size in enumerate([(24, 8), (8, 24), (16, 16), (24, 8)]):
        images.save(root / f"{i}.png", size=size)
        (root / f"{i}.txt").write_text(f"img{i}, red, green, blue")
    ds = ImageFolderDataset(root, resolution=16, captions={"shuffle": True, "keep_tokens": 1, "seed": 1},
                            buckets={"enabled": True, "step": 8})
    view = sync_cache(tmp_path / "cache", cache_spec(ds), Encoder(), batch_size=2, progress=False, sample=False)
    for epoch in (0, 1):
        view.set_epoch(epoch)
        ds.set_epoch(epoch)
        for i in range(4):
            cached, direct = view[i], ds[i]
            assert cached["caption"] == direct["caption"]
            assert tuple(cached["latents"].shape[-2:]) == tuple(s // 2 for s in direct["image"].shape[-2:])
            assert list(cached["target_size"]) == list(direct["target_size"])
