"""Loading a model leaves nothing behind: a checkpoint whose tiny local text encoder has no folder of its own on this
machine (a downloaded one, or folder=null) is rebuilt in a temporary folder that is gone once it is loaded."""

import tempfile

import pytest
import torch

from ldm.formats.load import load_bundle
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
from ldm.training.run.train import train
from tests.helpers.training import TINY_MODEL, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

CKPT = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"]


def listing(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_loading_a_checkpoint_five_times_leaves_the_temp_directory_as_it_was(tmp_path, monkeypatch):
    result = train(compose_train(tmp_path, TINY_MODEL + CKPT + ["model.text_encoder.folder=null",
                                                                "trainer.max_steps=1"]))
    stored = torch.load(result["last_checkpoint"], weights_only=True)["ldm"]["model"]["model"]["text_encoder"]
    assert stored["_target_"].endswith("from_tiny") and stored["folder"] is None  # built afresh at every load

    temp = tmp_path / "temp"
    (temp / "earlier").mkdir(parents=True)  # what another program left there stays as it was
    (temp / "earlier" / "file.txt").write_text("kept")
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # tempfile caches the folder it found first
    assert tempfile.gettempdir() == str(temp)
    before = listing(temp)
    for _ in range(5):
        bundle = load_bundle(result["last_checkpoint"])
        assert bundle.text_encoder(["a red square"]).shape[-1] == 32  # the loaded encoder works without its folder
        CLIPTextEncoder.from_tiny()
        DualCLIPTextEncoder.from_tiny()
    assert listing(temp) == before
