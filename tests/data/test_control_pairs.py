"""data=controlnet: a folder pair and a Hugging Face dataset (image, conditioning_image, text) give the same items,
the conditioning image cut like its image, in [0, 1]; batches carry it."""

import pytest
import torch
from PIL import Image

from ldm.data.collate import collate_image_caption
from ldm.data.control_pairs import ControlPairsDataset
from tests.helpers.control_pairs import write_control_pairs


def save_hf_pairs(datasets, pngs, controls, out):
    """The pairs as a Hugging Face dataset with diffusers' train_controlnet.py columns, saved to ``out``."""
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [Image.open(p) for p in pngs],
                                "conditioning_image": [Image.open(controls / p.name) for p in pngs],
                                "text": [p.with_suffix(".txt").read_text() for p in pngs]},
                               features=features).save_to_disk(str(out))


def test_folder_and_hf_dataset_give_the_same_pairs(tmp_path):
    datasets = pytest.importorskip("datasets")
    images, controls = write_control_pairs(tmp_path, n=4, size=20)
    folder = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16)
    pngs = sorted(images.glob("*.png"))
    save_hf_pairs(datasets, pngs, controls, tmp_path / "hf")
    hf = ControlPairsDataset(path=str(tmp_path / "hf"), resolution=16)
    assert len(folder) == len(hf) == 4
    for i in range(4):
        a, b = folder[i], hf[i]
        assert a["caption"] == b["caption"]
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["conditioning_image"], b["conditioning_image"])
        hint = a["conditioning_image"]
        assert hint.shape == (3, 16, 16) and 0 <= hint.min() and hint.max() <= 1
        # the silhouette lies where the square is: white control <-> coloured (non-white) image pixels
        square = (a["image"] < 0.9).any(0)
        assert ((hint[0] > 0.5) == square).float().mean() > 0.9
    batch = collate_image_caption([folder[0], folder[1]])
    assert batch["conditioning_image"].shape == (2, 3, 16, 16)
    grey = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16,
                               conditioning_channels=1)
    assert grey[0]["conditioning_image"].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="not a column"):
        ControlPairsDataset(path=str(tmp_path / "hf"), conditioning_image_column="edges")


def test_the_latent_cache_keeps_the_control_images(tmp_path):
    from ldm.data.auto_cache import cache_spec, sync_cache

    images, controls = write_control_pairs(tmp_path, n=5, size=20)
    pairs = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16)

    def encode(x, captions, generator=None):  # a stand-in VAE: the mean is the image's corner
        return {"mean": x[:, :, :4, :4], "logvar": torch.zeros_like(x[:, :, :4, :4])}

    spec = cache_spec(pairs)
    assert spec.settings["kind"] == "ControlPairs"
    view = sync_cache(tmp_path / "cache", spec, encode, store="posterior", seed=0, progress=False)
    assert view.encoded == 5
    for i in range(5):
        torch.testing.assert_close(view[i]["conditioning_image"], pairs[i]["conditioning_image"], atol=1e-6, rtol=0)
    # a changed control image is a new item: encoded again
    Image.new("RGB", (20, 20), (255, 255, 255)).save(controls / "002.png")
    view = sync_cache(tmp_path / "cache", cache_spec(pairs), encode, store="posterior", seed=0, progress=False)
    assert view.encoded == 1 and view[2]["conditioning_image"].min() == 1.0


# ---- aspect-ratio buckets, random crops and flips: one cut for the image and its control image

BUCKETS = {"enabled": True, "step": 8}


def negative_of(image):
    """The conditioning image the pairs of write_mixed_pairs should carry: 1 - the image's [0, 1] pixels."""
    return (1 - image) / 2


def assert_lined_up(item):
    # PIL's bicubic resize in fixed point: the negative of a resized image is the resized negative within 1 level
    assert item["conditioning_image"].shape == item["image"].shape
    err = (item["conditioning_image"] - negative_of(item["image"])).abs().max()
    assert err <= 2 / 255 + 1e-6, err


@pytest.mark.parametrize("buckets", [BUCKETS, None])
def test_pairs_line_up_under_buckets_random_crops_and_flips(tmp_path, buckets):
    from tests.helpers.control_pairs import write_mixed_pairs

    images, controls = write_mixed_pairs(tmp_path)
    pairs = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16, buckets=buckets,
                                center_crop=False, random_flip=True, seed=0)
    cuts = set()
    for _ in range(4):
        for i in range(len(pairs)):
            item = pairs[i]
            assert_lined_up(item)
            cuts.add((tuple(item["image"].shape), tuple(item["image"][:, 0, 0].tolist())))
    assert len(cuts) > 2 * len(pairs)  # the crops did move (2 columns or rows to spare in a bucket, 36 in a square)
    # a pair cut twice independently would not line up: the check above can fail
    other = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16, buckets=buckets,
                                center_crop=False, random_flip=True, seed=1)
    misaligned = [(pairs[i]["conditioning_image"] - negative_of(other[i]["image"])).abs().max() for i in range(8)]
    assert max(misaligned) > 0.2


def test_flips_mirror_the_image_and_its_control_together(tmp_path):
    from tests.helpers.control_pairs import write_mixed_pairs

    images, controls = write_mixed_pairs(tmp_path)
    plain = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16, buckets=BUCKETS)
    flips = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16, buckets=BUCKETS,
                                random_flip=True, seed=0)
    seen = set()
    for _ in range(3):
        for i in range(len(plain)):
            a, b = plain[i], flips[i]
            flipped = not torch.equal(a["image"], b["image"])
            seen.add(flipped)
            for key in ("image", "conditioning_image"):
                torch.testing.assert_close(b[key], a[key].flip(-1) if flipped else a[key], atol=0, rtol=0)
    assert seen == {False, True}


def test_different_aspect_ratios_land_in_their_own_buckets(tmp_path):
    from torch.utils.data import BatchSampler

    from ldm.data.bucket_sampler import BucketBatchSampler
    from ldm.data.datamodule import ImageCaptionDataModule
    from tests.helpers.control_pairs import MIXED_SIZES, write_mixed_pairs

    images, controls = write_mixed_pairs(tmp_path)
    pairs = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16, buckets=BUCKETS)
    assignment = pairs.bucket_assignment
    assert assignment.buckets == [(8, 24), (16, 16), (24, 8)]
    expected = {(52, 16): (24, 8), (16, 52): (8, 24), (20, 22): (16, 16)}
    for i, size in enumerate(MIXED_SIZES):
        width, height = expected[size]
        assert assignment.target(i) == (width, height)
        item = pairs[i]
        assert item["image"].shape == item["conditioning_image"].shape == (3, height, width)
        assert_lined_up(item)
    loader = ImageCaptionDataModule(pairs, batch_size=2, val_fraction=0, seed=0).train_dataloader()
    assert isinstance(loader.batch_sampler, BucketBatchSampler) and not isinstance(loader.batch_sampler, BatchSampler)
    seen = []
    for batch in loader:  # every batch of one bucket, its control images at that size
        assert len({tuple(s) for s in batch["target_size"].tolist()}) == 1
        assert batch["conditioning_image"].shape == batch["image"].shape
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(MIXED_SIZES)))


def test_a_control_image_of_another_size_is_brought_to_its_image(tmp_path, caplog):
    from tests.helpers.control_pairs import write_mixed_pairs

    images, controls = write_mixed_pairs(tmp_path)
    Image.open(controls / "000.png").resize((26, 8), Image.Resampling.BICUBIC).save(controls / "000.png")  # half
    Image.new("RGB", (39, 12), (0, 0, 0)).save(controls / "001.png")  # 3.25:1 like its image: resized, used
    Image.new("RGB", (20, 20), (0, 0, 0)).save(controls / "002.png")  # square beside a 3.25:1 image: no line-up
    pairs = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16, buckets=BUCKETS)
    item = pairs[0]
    assert item["conditioning_image"].shape == item["image"].shape == (3, 8, 24)
    # resized from half the resolution: the same picture, softened by the round trip
    assert (item["conditioning_image"] - negative_of(item["image"])).abs().mean() < 0.15
    assert pairs[1]["conditioning_image"].max() == 0
    with caplog.at_level("WARNING", logger="ldm.data"):
        item = pairs[2]
    assert item["index"] == 3 and "002.png" in pairs.inner.bad_files  # skipped like an unreadable image, named
    assert "another aspect ratio" in caplog.text


def test_the_latent_cache_keeps_bucketed_pairs_cut_alike(tmp_path):
    """The cache holds each control image at its bucket size beside the latent: read back, the items equal the
    uncached ones; with random flips both variants are cached, the latent and its control mirrored together."""
    import torch.nn.functional as F

    from ldm.data.auto_cache import cache_spec, sync_cache
    from tests.helpers.control_pairs import write_mixed_pairs

    images, controls = write_mixed_pairs(tmp_path)

    def encode(x, captions, generator=None):  # a stand-in VAE whose "latent" is the image at a quarter size
        mean = F.avg_pool2d(x, 4)
        return {"mean": mean, "logvar": torch.zeros_like(mean)}

    plain = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16, buckets=BUCKETS)
    view = sync_cache(tmp_path / "cache", cache_spec(plain), encode, store="posterior", sample=False,
                      progress=False)
    assert view.encoded == len(plain) and len(view.parts) == 3  # one part per bucket
    for i in range(len(plain)):
        cached, item = view[i], plain[i]
        torch.testing.assert_close(cached["conditioning_image"], item["conditioning_image"], atol=1e-6, rtol=0)
        torch.testing.assert_close(cached["latents"], F.avg_pool2d(item["image"][None], 4)[0])
        for key in ("original_size", "crop_top_left", "target_size"):
            assert tuple(cached[key]) == tuple(item[key])

    flips = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16, buckets=BUCKETS,
                                random_flip=True)
    spec = cache_spec(flips)
    assert spec.flip
    view = sync_cache(tmp_path / "flips", spec, encode, store="posterior", sample=False, progress=False)
    assert view.encoded == 2 * len(plain)
    seen = set()
    for epoch in range(3):
        view.set_epoch(epoch)
        for i in range(len(plain)):
            cached, item = view[i], plain[i]
            latent = F.avg_pool2d(item["image"][None], 4)[0]
            flipped = not torch.allclose(cached["latents"], latent)
            seen.add(flipped)
            torch.testing.assert_close(cached["latents"], latent.flip(-1) if flipped else latent)
            control = item["conditioning_image"].flip(-1) if flipped else item["conditioning_image"]
            torch.testing.assert_close(cached["conditioning_image"], control, atol=1e-6, rtol=0)
            top, left = item["crop_top_left"]
            if flipped:  # measured from the mirrored left edge (kohya), in the resized image
                left = plain.bucket_assignment.resized[i][0] - item["image"].shape[-1] - left
            assert tuple(cached["crop_top_left"]) == (top, left)
            assert tuple(cached["target_size"]) == tuple(item["target_size"])
    assert seen == {False, True}


def test_a_hf_dataset_of_pairs_is_bucketed_and_cut_like_the_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from tests.helpers.control_pairs import write_mixed_pairs

    images, controls = write_mixed_pairs(tmp_path)
    pngs = sorted(images.glob("*.png"))
    save_hf_pairs(datasets, pngs, controls, tmp_path / "hf")
    options = dict(resolution=16, buckets=BUCKETS, center_crop=False, random_flip=True, seed=0)
    folder = ControlPairsDataset(root=str(images), conditioning_root=str(controls), **options)
    hf = ControlPairsDataset(path=str(tmp_path / "hf"), **options)
    assert hf.bucket_assignment.buckets == folder.bucket_assignment.buckets
    assert hf.bucket_assignment.bucket_of == folder.bucket_assignment.bucket_of
    for i in range(len(folder)):  # the same seeded draws: the same cuts
        a, b = folder[i], hf[i]
        assert_lined_up(b)
        for key in ("image", "conditioning_image"):
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
        assert tuple(a["crop_top_left"]) == tuple(b["crop_top_left"])
