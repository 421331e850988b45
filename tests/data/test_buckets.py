"""Aspect-ratio buckets (ldm.data.buckets): kohya's table and assignment against numbers derived by hand, the
crop and its micro-conditioning record, no_upscale's per-image buckets, and the config errors."""

import pytest
import torch

from ldm.data.buckets import BucketSettings, assign_buckets, bucket_table, no_upscale_bucket, select_bucket
from ldm.data.image_folder import ImageFolderDataset


def test_table_at_512_equals_kohyas_derived_by_hand():
    # kohya's make_bucket_resolutions((512, 512), min_size=256, max_size=1024, divisible=64):
    # max_area = (512 // 64) * (512 // 64) = 64 units of 64x64 px; square side int(sqrt(64)) * 64 = 512.
    # for width = 256 .. 1024 step 64 (width units u = 4 .. 16): height = min(1024, (64 // u) * 64)
    #   u=4: 16*64=1024 -> (256, 1024)      u=5: 12 -> 768 -> (320, 768)     u=6: 10 -> 640 -> (384, 640)
    #   u=7: 9 -> 576 -> (448, 576)         u=8: 8 -> 512 -> (512, 512)      u=9: 7 -> 448 -> (576, 448)
    #   u=10: 6 -> 384 -> (640, 384)        u=11: 5 -> 320 -> (704, 320)     u=12: 5 -> 320 -> (768, 320)
    #   u=13..16: 4 -> 256 -> (832|896|960|1024, 256)
    # plus every transpose; sorted by (width, height).
    landscape = [(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                 (1024, 256)]
    expected = sorted(set(landscape) | {(h, w) for w, h in landscape})
    assert bucket_table(512, 64, 256, 1024) == expected
    assert len(expected) == 17 and all(w * h <= 512 * 512 for w, h in expected)


def test_assignment_of_fixed_sizes_derived_by_hand():
    # Table at resolution 64, step 16, min 32, max 128: area (64 // 16)^2 = 16 units, square 64;
    # u=2: 8 units -> 128 -> (32, 128); u=3: 5 -> 80 -> (48, 80); u=4: (64, 64); u=5: 3 -> 48 -> (80, 48);
    # u=6: 2 -> 32 -> (96, 32); u=7: 2 -> (112, 32); u=8: 2 -> (128, 32); + transposes. Aspect ratios w/h:
    # (32,96) .333, (32,112) .286, (32,128) .25, (48,80) .6, (64,64) 1, (80,48) 1.667, (96,32) 3, (112,32) 3.5,
    # (128,32) 4.
    table = bucket_table(64, 16, 32, 128)
    assert table == [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]
    sizes = [(100, 100), (300, 200), (200, 300), (640, 480), (1000, 300), (60, 200), (50, 50)]
    # 100x100: ratio 1 -> (64, 64), scale 64/100 -> resized (64, 64)
    # 300x200: ratio 1.5; nearest 1.667 (80, 48) error +.167 (bucket wider: match width) scale 80/300:
    #   (80, int(53.33 + .5) = 53)
    # 200x300: .667; nearest .6 (48, 80), error -.067 (bucket narrower: match height) scale 80/300: (53, 80)
    # 640x480: 1.333; (80, 48) error +1/3 vs (64, 64) error -1/3, equal on paper; in floats 80/48 - 640/480 =
    #   0.3333333333333335 > |1 - 640/480| = 0.33333333333333326 (kohya's numpy argmin sees the same numbers)
    #   -> (64, 64): the bucket is narrower, match its height: scale 64/480 -> (int(85.83) = 85, 64)
    # 1000x300: 3.333; 3.5 (112, 32) error +.167 vs 3 error -.333 -> (112, 32), width: scale .112 -> (112, 34)
    # 60x200: .3; .286 error -.014 (32, 112): height: scale .56 -> (34, 112)
    # 50x50: (64, 64), enlarged to (64, 64)
    expected = [((64, 64), (64, 64)), ((80, 48), (80, 53)), ((48, 80), (53, 80)), ((64, 64), (85, 64)),
                ((112, 32), (112, 34)), ((32, 112), (34, 112)), ((64, 64), (64, 64))]
    assert [select_bucket(w, h, table) for w, h in sizes] == expected
    a = assign_buckets(sizes, 64, BucketSettings(enabled=True, step=16, min_side=32, max_side=128))
    assert a.buckets == [(32, 112), (48, 80), (64, 64), (80, 48), (112, 32)]  # the buckets in use
    assert a.counts() == [1, 1, 3, 1, 1]
    assert "64 x 64" in a.describe() and a.table == table


def test_no_upscale_gives_per_image_buckets_derived_by_hand():
    # within the max area (64 * 64 = 4096): keep the size, bucket = size rounded down to the step (16)
    assert no_upscale_bucket(50, 40, 4096, 16) == ((48, 32), (50, 40))
    # 200 x 100 > 4096: ratio 2, w = sqrt(4096 * 2) = 90.51, h = 4096 / w = 45.25. Rounding the width to the step:
    # int(90.51 + .5) = 91 -> 91 - 91 % 16 = 80, its height round_to_step(80 / 2) = 32: ratio 2.5; rounding the
    # height: int(45.75) = 45 -> 32, its width round_to_step(64) = 64: ratio 2.0 -> the height's rounding wins:
    # resized (int(32 * 2 + .5), 32) = (64, 32), bucket (64, 32)
    assert no_upscale_bucket(200, 100, 4096, 16) == ((64, 32), (64, 32))
    # a side under one step gets one step
    assert no_upscale_bucket(40, 10, 4096, 16)[0] == (32, 16)
    a = assign_buckets([(50, 40), (200, 100), (50, 40)], 64, BucketSettings(enabled=True, step=16, no_upscale=True))
    assert a.buckets == [(48, 32), (64, 32)] and a.counts() == [2, 1] and a.table == []


def test_settings_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data.train.buckets.step=64 is larger than data.train.resolution=32"):
        assign_buckets([(10, 10)], 32, BucketSettings(enabled=True, step=64))
    with pytest.raises(ValueError, match=r"data.train.buckets.min_side"):
        assign_buckets([(10, 10)], 64, BucketSettings(enabled=True, step=16, min_side=128))
    with pytest.raises(ValueError, match=r"data.train.buckets.max_side"):
        assign_buckets([(10, 10)], 64, BucketSettings(enabled=True, step=16, max_side=32))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepp'\]"):
        BucketSettings.of({"enabled": True, "stepp": 16})


def test_folder_samples_are_cropped_to_their_bucket_with_records(tmp_path, images):
    for name, size in {"wide": (96, 48), "tall": (30, 90), "square": (40, 40)}.items():
        images.save(tmp_path / f"{name}.png", size=size)
    ds = ImageFolderDataset(tmp_path, resolution=32, buckets={"enabled": True, "step": 16})
    # table at 32, step 16, min 16, max 64: (16,48), (16,64), (32,32), (48,16), (64,16)
    by_key = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    square, tall, wide = by_key["square.png"], by_key["tall.png"], by_key["wide.png"]
    assert square["image"].shape == (3, 32, 32) and square["crop_top_left"] == (0, 0)
    # tall 30x90 (ratio .333) -> (16, 48): height 48 exactly (scale 48/90 -> width int(16.5) = 16), no crop
    assert tall["image"].shape == (3, 48, 16) and tall["target_size"] == (48, 16)
    assert tall["original_size"] == (90, 30) and tall["crop_top_left"] == (0, 0)
    # wide 96x48 (ratio 2): (32,32) error -1 ties with (48,16) error +1 -> the first, (32, 32); resized by its
    # height to (64, 32), centre crop from left (64 - 32) // 2 = 16
    assert wide["image"].shape == (3, 32, 32) and wide["crop_top_left"] == (0, 16)
    assert wide["original_size"] == (48, 96)


def test_random_crop_and_flip_records(tmp_path, images):
    images.save(tmp_path / "wide.png", size=(96, 48))
    ds = ImageFolderDataset(tmp_path, resolution=32, center_crop=False, random_flip=True, seed=3,
                            buckets={"enabled": True, "step": 16})
    lefts = {ds[0]["crop_top_left"][1] for _ in range(40)}
    assert lefts <= set(range(0, 33)) and len(lefts) > 3  # anywhere in the 64 - 32 px of slack
    image = images.make(size=(96, 48)).resize((64, 32))
    for _ in range(10):  # the crop at the recorded offset, mirrored when flipped (left measured from the right)
        item = ds[0]
        left = item["crop_top_left"][1]
        direct = torch.tensor(list(image.crop((left, 0, left + 32, 32)).getdata())).float()
        mirrored = torch.tensor(list(image.crop((32 - left, 0, 64 - left, 32)).transpose(0).getdata())).float()
        pixels = ((item["image"].permute(1, 2, 0).reshape(-1, 3) + 1) * 127.5).round()
        assert torch.allclose(pixels, direct, atol=1) or torch.allclose(pixels, mirrored, atol=1)


def test_disabled_is_todays_square_crop(tmp_path, images):
    images.save(tmp_path / "wide.png", size=(96, 48))
    plain = ImageFolderDataset(tmp_path, resolution=32)
    off = ImageFolderDataset(tmp_path, resolution=32, buckets={"enabled": False, "step": 16})
    assert off.bucket_assignment is None and set(off[0]) == set(plain[0])
    torch.testing.assert_close(off[0]["image"], plain[0]["image"])


def test_hf_dataset_rows_go_to_their_buckets_and_cache_keys_them(tmp_path, images):
    import datasets

    from ldm.data.auto_cache import cache_spec
    from ldm.data.hf_dataset import HFDataset

    sizes = [(96, 48), (30, 90), (40, 40)]
    datasets.Dataset.from_dict(
        {"image": [images.make(size=s) for s in sizes], "text": ["wide", "tall", "square"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    ).save_to_disk(str(tmp_path / "saved"))
    ds = HFDataset(str(tmp_path / "saved"), resolution=32, buckets={"enabled": True, "step": 16})
    # the same buckets as the folder test above: wide ties -> (32, 32), tall -> (16, 48), square -> (32, 32)
    assert [tuple(ds[i]["image"].shape[-2:]) for i in range(3)] == [(32, 32), (48, 16), (32, 32)]
    assert ds[1]["original_size"] == (90, 30) and ds[0]["crop_top_left"] == (0, 16)
    spec = cache_spec(ds)
    assert spec.buckets is ds.bucket_assignment and spec.settings["buckets"]["table"][0] == [16, 48]
    plain = cache_spec(HFDataset(str(tmp_path / "saved"), resolution=32))
    assert spec.items != plain.items and "buckets" not in plain.settings  # another bucket: other rows, folder
