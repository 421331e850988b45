import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.tasks.shapes.checker import classify_shapes_image, prompt_accuracy
from ldm.tasks.shapes.dataset import ShapesDataset
from ldm.tasks.shapes.palette import parse_caption
from ldm.data.transforms import tensor_to_pil


@pytest.fixture(scope="module")
def batch():
    dataset = ShapesDataset(size=300, resolution=32, seed=0)
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s["image"] for s in samples]), [s["caption"] for s in samples]


def gaussian_blur(images, sigma=0.8):
    offsets = torch.arange(3) - 1.0
    kernel_1d = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel_1d /= kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def test_sample_format():
    sample = ShapesDataset(size=5, resolution=32)[3]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= -1 and sample["image"].max() <= 1
    assert sample["index"] == 3
    assert parse_caption(sample["caption"])[1] in ("circle", "square", "triangle")
    assert sample["caption"].endswith("background")


def test_deterministic_by_seed_and_index():
    a, b, c = ShapesDataset(size=20, seed=1), ShapesDataset(size=20, seed=1), ShapesDataset(size=20, seed=2)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"] for i in range(20))
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(20))
    assert torch.equal(a[7]["image"], a[7]["image"])  # no hidden state between calls
    assert len({a[i]["caption"] for i in range(20)}) > 5


def test_variety_and_contrast():
    dataset = ShapesDataset(size=400, seed=0)
    specs = [dataset.spec(i) for i in range(400)]
    assert {s.shape for s in specs} == {"circle", "square", "triangle"}
    assert {s.color for s in specs} == set(dataset.colors)
    assert {s.background for s in specs} == set(dataset.backgrounds)
    assert all(s.color != s.background for s in specs)


def test_index_and_argument_errors():
    dataset = ShapesDataset(size=3)
    with pytest.raises(IndexError):
        dataset[3]
    with pytest.raises(ValueError, match="known colours"):
        ShapesDataset(colors=("red", "chartreuse"))
    with pytest.raises(ValueError, match="too close to every background"):
        ShapesDataset(colors=("white",), backgrounds=("white",))
    with pytest.raises(ValueError, match="shapes"):
        ShapesDataset(shapes=("hexagon",))


def test_parse_caption():
    assert parse_caption("a red circle on a white background") == ("red", "circle")
    assert parse_caption("Two BLUE triangles on black") == ("blue", "triangle")
    assert parse_caption("a photo of a cat") == ("unknown", "unknown")


@pytest.mark.parametrize("corruption", ["clean", "noise", "blur", "blur+noise"])
def test_checker_accuracy_on_generated_images(batch, corruption):
    images, captions = batch
    noise = 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    if "blur" in corruption:
        images = gaussian_blur(images)
    if "noise" in corruption:
        images = (images + noise).clamp(-1, 1)
    result = prompt_accuracy(images, captions)
    assert result["n"] == 300
    assert result["color_acc"] >= 0.98 and result["shape_acc"] >= 0.98, result


def test_checker_accepts_pil_and_detects_mismatch():
    dataset = ShapesDataset(size=4, seed=5)
    sample = dataset[0]
    spec = dataset.spec(0)
    assert classify_shapes_image(tensor_to_pil(sample["image"])) == (spec.color, spec.shape)
    wrong = "a {} {} on a gray background".format(
        "green" if spec.color != "green" else "red", "circle" if spec.shape != "circle" else "square"
    )
    assert prompt_accuracy([sample["image"]], [wrong]) == {"color_acc": 0.0, "shape_acc": 0.0, "n": 1}


def test_checker_blank_images_are_unknown():
    assert classify_shapes_image(torch.zeros(3, 32, 32)) == ("unknown", "unknown")
    assert classify_shapes_image(Image.new("RGB", (32, 32), "white")) == ("unknown", "unknown")
    assert classify_shapes_image(torch.rand(3, 16, 16) * 2 - 1)  # noise: any label, no crash
    assert prompt_accuracy([], []) == {"color_acc": 0.0, "shape_acc": 0.0, "n": 0}
