"""The shapes ControlNet task: each item's control image is its shape's silhouette, and the IoU of a generated
shape's pixels with the control mask is measured (closed forms: a drawn shape against its own silhouette is 1, against
another's it is their overlap)."""

import numpy as np
import pytest
import torch

from ldm.tasks.shapes.dataset import ShapesDataset
from ldm.tasks.shapes.silhouette import SilhouetteShapesDataset, mask_iou, silhouette_iou


def test_the_control_image_is_the_shapes_silhouette():
    ds = SilhouetteShapesDataset(size=6, resolution=32, seed=3)
    plain = ShapesDataset(size=6, resolution=32, seed=3)
    for i in range(6):
        item = ds[i]
        torch.testing.assert_close(item["image"], plain[i]["image"])
        hint = item["conditioning_image"]
        assert hint.shape == (3, 32, 32) and set(hint.unique().tolist()) <= {0.0, 1.0}
        background = item["image"][:, 0, 0][:, None, None]  # corners are never covered (margin >= 1 px)
        coloured = (item["image"] - background).abs().sum(0) > 1e-6
        assert torch.equal(hint[0].bool(), coloured)
    assert ds.cache_key() != plain.cache_key()


def test_mask_iou_closed_forms():
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # 8 pixels, 4 shared
    assert mask_iou(a, a) == 1.0 and mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, ~a) == 0.0 and mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_silhouette_iou_of_drawn_shapes():
    ds = SilhouetteShapesDataset(size=8, resolution=32, seed=0)
    images = torch.stack([ds[i]["image"] for i in range(8)])
    masks = torch.stack([ds[i]["conditioning_image"] for i in range(8)])
    assert silhouette_iou(images, masks) == pytest.approx([1.0] * 8)
    shifted = silhouette_iou(images, masks.roll(1, 0))  # another item's silhouette
    assert all(v < 1.0 for v in shifted) and np.mean(shifted) < 0.6
    assert silhouette_iou(torch.zeros(1, 3, 32, 32), masks[:1]) == [0.0]  # no shape drawn: nothing overlaps
    with pytest.raises(ValueError, match="1 images but 2 masks"):
        silhouette_iou(images[:1], masks[:2])


def test_evaluate_silhouettes_with_and_without_the_controlnet(tmp_path):
    """On a tiny random model: the numbers are there, in range, and the ControlNet is what differs."""
    from ldm.diffusion.schedules import NoiseSchedule
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.bundle import ModelBundle
    from ldm.models.controlnet import ControlNet
    from ldm.models.unet import UNet
    from ldm.tasks.shapes.silhouette import evaluate_silhouettes
    from ldm.models.text_encoder import CLIPTextEncoder
    from ldm.models.tiny_clip import write_tiny_clip
    from tests.helpers.models import randomize

    unet = randomize(UNet.from_preset("tiny"), 1)
    text = CLIPTextEncoder.from_pretrained(write_tiny_clip(tmp_path / "clip"))
    bundle = ModelBundle(unet, randomize(AutoencoderKL.from_preset("tiny"), 2), text, NoiseSchedule.make("scaled_linear"))
    net = ControlNet.from_unet(unet, hint_channels=(8, 16))
    ds = SilhouetteShapesDataset(size=4, resolution=16, seed=0)
    same = evaluate_silhouettes(bundle, net, ds, n=4, steps=2, batch_size=2)  # a fresh ControlNet adds zeros
    assert same["with"] == same["without"]
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(std=0.3)
    numbers = evaluate_silhouettes(bundle, net, ds, n=4, steps=2, batch_size=2)
    assert numbers["without"] == same["without"]  # the same seeds: only the ControlNet changed
    for side in ("with", "without"):
        assert numbers[side]["n"] == 4 and all(0 <= numbers[side][k] <= 1 for k in ("iou", "color_acc", "shape_acc"))
