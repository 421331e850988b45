"""data=controlnet: a folder pair and a Hugging Face dataset (image, conditioning_image, text) give the same items,
the conditioning image cut like its image, in [0, 1]; batches carry it."""

import pytest
import torch
from PIL import Image

from ldm.data.collate import collate_image_caption
from ldm.data.control_pairs import ControlPairsDataset
from tests.helpers.control_pairs import write_control_pairs


def test_folder_and_hf_dataset_give_the_same_pairs(tmp_path):
    datasets = pytest.importorskip("datasets")
    images, controls = write_control_pairs(tmp_path, n=4, size=20)
    folder = ControlPairsDataset(root=str(images), conditioning_root=str(controls), resolution=16)
    pngs = sorted(images.glob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [Image.open(p) for p in pngs],
                                "conditioning_image": [Image.open(controls / p.name) for p in pngs],
                                "text": [p.with_suffix(".txt").read_text() for p in pngs]},
                               features=features).save_to_disk(str(tmp_path / "hf"))
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
