import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.transforms import ImageTransform, pil_to_tensor, tensor_to_pil, to_rgb


def test_output_shape_and_range(images):
    out = ImageTransform(16)(images.make(size=(40, 24)))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert out.min() == -1  # black block survives the crop


@pytest.mark.parametrize("size", [(40, 24), (24, 40), (16, 16), (10, 7)])
def test_resize_shorter_side_then_square_crop(images, size):
    transform = ImageTransform(16, center_crop=False, seed=0)
    assert transform(images.make(size=size)).shape == (3, 16, 16)


def test_center_crop_is_centered():
    array = np.zeros((16, 48, 3), dtype=np.uint8)
    array[:, 16:32] = 255  # white middle third
    out = ImageTransform(16)(Image.fromarray(array))
    assert torch.all(out == 1)


def test_random_crop_is_seeded():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 64, 3), dtype=np.uint8))

    def crops(seed):
        transform = ImageTransform(16, center_crop=False, seed=seed)
        return [transform(image) for _ in range(6)]

    first, again = crops(1), crops(1)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert len({x.sum().item() for x in first}) > 1  # offsets vary within one stream


def test_flip(images):
    image = images.make(size=(16, 16))
    plain = ImageTransform(16)(image)
    flipper = ImageTransform(16, random_flip=True, seed=3)
    flipped = [out for out in (flipper(image) for _ in range(20)) if not torch.equal(out, plain)]
    assert 0 < len(flipped) < 20
    assert torch.equal(flipped[0], plain.flip(-1))


def test_modes_become_rgb_and_alpha_goes_on_white():
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert torch.all(ImageTransform(8)(transparent) == 1)
    for mode in ["L", "LA", "P", "1", "CMYK", "I;16", "I", "F"]:
        assert to_rgb(Image.new("RGB", (8, 8), (10, 200, 30)).convert(mode)).mode == "RGB"
    sixteen_bit = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert torch.all(pil_to_tensor(sixteen_bit) == 1)
    palette_with_transparency = Image.new("P", (8, 8), 0)
    palette_with_transparency.info["transparency"] = 0
    assert torch.all(pil_to_tensor(palette_with_transparency) == 1)


def test_tensor_pil_round_trip(images):
    image = images.make(size=(16, 16))
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(image))), np.asarray(image))


def test_bad_resolution():
    with pytest.raises(ValueError, match="resolution"):
        ImageTransform(0)
