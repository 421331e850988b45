"""A latent cache's manifest holds plain data: the dataset's class name and a plain description, never a Python
object's repr (``<... object at 0x7f...>``: an address of the process that wrote it)."""

import pytest
import torch
from torch.utils.data import Subset

from ldm.data.latent_cache import MANIFEST, build_latent_cache, dataset_name, plain_data, read_manifest
from ldm.models.autoencoder import AutoencoderKL
from ldm.tasks.shapes.dataset import ShapesDataset

pytestmark = pytest.mark.usefixtures("one_thread")


class Opaque:
    """An object with the default repr."""


def test_plain_data():
    assert plain_data({"a": [1, 2.5, "x", None, True], 3: (Opaque(), float("nan"))}) == {
        "a": [1, 2.5, "x", None, True], "3": ["Opaque", "float"]}
    assert dataset_name(Subset(Subset(ShapesDataset(size=4, resolution=8), [0, 1]), [0])) == "ShapesDataset"


def test_build_latent_cache_writes_no_object_repr(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL.from_preset("tiny").eval()
    source = Subset(ShapesDataset(size=6, resolution=8, seed=1), [0, 2, 4])
    build_latent_cache(source, tmp_path, vae, None, store="mode", text="caption", progress=False,
                       description={"how": "a test", "object": Opaque()})
    text = (tmp_path / MANIFEST).read_text()
    assert "object at 0x" not in text and " at 0x" not in text
    manifest = read_manifest(tmp_path)
    assert manifest["source"] == "ShapesDataset"
    assert manifest["description"] == {"how": "a test", "object": "Opaque"}

