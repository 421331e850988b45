"""DreamBooth data: instance/class pairing and the batch layout (diffusers' train_dreambooth.py collate), masks
from a folder or the alpha channel (through the image's resize + crop), the latent cache over both folders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.auto_cache import sync_cache
from ldm.data.datamodule import ImageCaptionDataModule
from ldm.data.dreambooth import DreamBoothDataset, count_images


def write(folder: Path, n: int, colour, size=(8, 8), alpha=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a = np.zeros((size[1], size[0], 4), np.uint8)
        a[..., :3] = colour
        a[..., 3] = 255 if alpha is None else alpha
        a[0, 0, :3] = i  # tell the images apart
        Image.fromarray(a, "RGBA" if alpha is not None else None).convert("RGBA" if alpha is not None else "RGB") \
            .save(folder / f"{i:02d}.png")
        paths.append(folder / f"{i:02d}.png")
    return paths


@pytest.fixture
def folders(tmp_path):
    write(tmp_path / "inst", 3, (250, 0, 0))
    write(tmp_path / "cls", 5, (0, 0, 250))
    return tmp_path


def test_items_pair_instance_and_class_rows(folders):
    ds = DreamBoothDataset(folders / "inst", "a sks thing", folders / "cls", "a thing", num_class_images=4,
                           resolution=8)
    assert (ds.n_instance, ds.n_class, len(ds)) == (3, 4, 4)  # the first num_class_images class images
    item = ds[3]
    assert item["caption"] == "a sks thing" and item["prior"]["caption"] == "a thing"
    assert item["key"] == "00.png" and item["prior"]["key"] == "03.png"  # instance 3 mod 3, class 3 mod 4
    assert float(item["image"][0].mean()) > 0.9 and float(item["prior"]["image"][2].mean()) > 0.9  # red, blue
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["caption"] == ["a sks thing"] * 2 + ["a thing"] * 2
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["image"].shape == (4, 3, 8, 8) and "mask" not in batch
    assert count_images(folders / "cls") == 5 and count_images(folders / "none") == 0


def test_a_class_image_caption_file_wins_and_a_prompt_list_needs_one_for_each(folders):
    (folders / "cls" / "01.txt").write_text("a blue thing on white\n")
    ds = DreamBoothDataset(folders / "inst", "a sks thing", folders / "cls", "a thing", num_class_images=3,
                           resolution=8)
    assert [ds[k]["prior"]["caption"] for k in range(3)] == ["a thing", "a blue thing on white", "a thing"]
    assert [ds[k]["caption"] for k in range(3)] == ["a sks thing"] * 3  # instance images keep instance_prompt
    with pytest.raises(ValueError, match=r"data.train.class_root: 2 class image\(s\) have no caption file.*00.png"):
        DreamBoothDataset(folders / "inst", "a sks thing", folders / "cls", ["a thing", "a blue thing"],
                          num_class_images=3, resolution=8)
    with pytest.raises(ValueError, match="class_prompt must be a prompt or a non-empty list"):
        DreamBoothDataset(folders / "inst", "a sks thing", folders / "cls", [], resolution=8)


def test_without_class_folder_the_batch_has_instance_rows_only(folders):
    ds = DreamBoothDataset(folders / "inst", "a sks thing", resolution=8)
    assert len(ds) == 3 and "prior" not in ds[0]
    assert ds.collate_fn([ds[0], ds[2]])["is_prior"].tolist() == [False, False]


def test_datamodule_uses_the_dreambooth_collate(folders):
    ds = DreamBoothDataset(folders / "inst", "a sks thing", folders / "cls", "a thing", resolution=8)
    dm = ImageCaptionDataModule(ds, batch_size=2, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["is_prior"].tolist() == [False, False, True, True] and batch["image"].shape[0] == 4


def test_masks_from_a_folder_follow_resize_and_crop(folders):
    masks = folders / "masks"
    masks.mkdir()
    for i in range(3):  # a 16x8 mask of each 16x8 image (one a JPEG: any image extension)
        m = np.zeros((8, 16), np.uint8)
        m[:, 4:8] = 255  # columns 4..7 of 16 -> resized to 8x4: columns 2..3 -> centre crop (2..5): columns 0..1
        Image.fromarray(m, "L").save(masks / f"{i:02d}.jpg" if i == 2 else masks / f"{i:02d}.png")
    write(folders / "wide", 3, (250, 0, 0), size=(16, 8))
    ds = DreamBoothDataset(folders / "wide", "a sks thing", folders / "cls", "a thing", resolution=4,
                           mask_root=masks)
    mask = ds[0]["mask"]
    assert mask.shape == (1, 4, 4) and mask.dtype == torch.float32
    assert mask[0, :, :2].min() > 0.7 and mask[0, :, 3].max() < 0.1
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["mask"].shape == (4, 1, 4, 4)
    assert torch.equal(batch["mask"][2:], torch.ones(2, 1, 4, 4))  # class rows: learned whole
    (masks / "01.png").unlink()
    with pytest.raises(FileNotFoundError, match="mask_root.*01"):
        DreamBoothDataset(folders / "wide", "a sks thing", resolution=4, mask_root=masks)


def test_mask_from_alpha(tmp_path):
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:4] = 255
    write(tmp_path / "inst", 2, (0, 200, 0), alpha=alpha)
    ds = DreamBoothDataset(tmp_path / "inst", "a sks thing", resolution=8, mask_from_alpha=True)
    mask = ds[1]["mask"][0]
    assert torch.equal(mask[:4], torch.ones(4, 8)) and torch.equal(mask[4:], torch.zeros(4, 8))
    # the image itself is composited on white where transparent
    assert float(ds[1]["image"][:, 4:].min()) == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_root="cls"), "class_prompt"),
    (dict(mask_from_alpha=True, random_flip=True), "random_flip"),
    (dict(mask_from_alpha=True, mask_root="m"), "choose one"),
    (dict(num_class_images=0), "num_class_images"),
    (dict(class_root="empty", class_prompt="a thing"), "no class images"),
])
def test_bad_settings_name_the_key(folders, kwargs, match):
    (folders / "empty").mkdir()
    kwargs = {k: (str(folders / v) if k in ("class_root", "mask_root") else v) for k, v in kwargs.items()}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        DreamBoothDataset(folders / "inst", "a sks thing", resolution=8, **kwargs)


def test_mask_folder_inside_the_instance_folder_is_refused(folders):
    write(folders / "inst" / "masks", 3, (255, 255, 255))
    with pytest.raises(ValueError, match="inside instance_root"):
        DreamBoothDataset(folders / "inst", "a sks thing", resolution=8, mask_root=folders / "inst" / "masks")


def test_latent_cache_holds_both_folders_and_keeps_the_pairing(folders, tmp_path):
    ds = DreamBoothDataset(folders / "inst", "a sks thing", folders / "cls", "a thing", resolution=8)
    spec = ds.cache_spec()
    assert len(spec.items) == 3 + 5 and spec.items[0].startswith("instance:") and spec.items[3].startswith("class:")

    def encode(images, captions, generator=None):  # a stand-in VAE: the 2x2-pooled image is the latent
        return {"latents": torch.nn.functional.avg_pool2d(images, 4)}

    view = sync_cache(tmp_path / "cache", spec, encode, store="mode", progress=False)
    cached = ds.with_cache(view)
    item = cached[4]  # instance 4 mod 3 = 1, class 4
    torch.testing.assert_close(item["latents"], torch.nn.functional.avg_pool2d(ds[4]["image"][None], 4)[0])
    torch.testing.assert_close(item["prior"]["latents"],
                               torch.nn.functional.avg_pool2d(ds[4]["prior"]["image"][None], 4)[0])
    assert item["caption"] == "a sks thing" and item["prior"]["caption"] == "a thing"
    batch = cached.collate_fn([cached[0], cached[1]])
    assert batch["latents"].shape == (4, 3, 2, 2) and batch["is_prior"].tolist() == [False, False, True, True]
    # a new class image is encoded alone on the next sync
    write(folders / "more", 1, (0, 0, 250))
    (folders / "more" / "00.png").rename(folders / "cls" / "05.png")
    ds2 = DreamBoothDataset(folders / "inst", "a sks thing", folders / "cls", "a thing", resolution=8)
    assert sync_cache(tmp_path / "cache", ds2.cache_spec(), encode, store="mode", progress=False).encoded == 1


def test_a_val_split_of_pairs_is_not_cached_silently(folders):
    from torch.utils.data import Subset

    from ldm.data.auto_cache import cache_spec

    ds = DreamBoothDataset(folders / "inst", "a sks thing", folders / "cls", "a thing", resolution=8)
    with pytest.raises(ValueError, match="val_fraction=0"):
        cache_spec(Subset(ds, [0, 1]))
    dm = ImageCaptionDataModule(ds, val_fraction=0.4, batch_size=1, seed=0)  # on the fly a split batches as pairs
    dm.setup("fit")
    assert isinstance(dm.val_dataset, Subset)
    assert next(iter(dm.val_dataloader()))["is_prior"].tolist() == [False, True]
