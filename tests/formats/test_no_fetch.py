"""A file never makes ldm download anything (issue 25): a hub id stored in a checkpoint (the text encoder node, a
LoRA run's base) is taken only from this machine's hub cache; otherwise a CheckpointError names the file, the key
and how to get the model, and no connection is attempted, whatever HF_HUB_OFFLINE says."""

import socket

import pytest
import torch

from ldm.formats.safe_load import CheckpointError

UNET = {"_target_": "ldm.models.unet.UNet", "model_channels": 32, "channel_mult": [1], "attention_levels": [],
        "num_heads": 1, "context_dim": 8}
AE = {"_target_": "ldm.models.autoencoder.IdentityAutoencoder"}
SCHEDULE = {"_target_": "ldm.diffusion.schedules.NoiseSchedule.make"}
HUB_TEXT = {"_target_": "ldm.models.text_encoder.CLIPTextEncoder.from_pretrained",
            "path_or_hub_id": "someone/text-encoder-from-a-forum"}
TINY_TEXT = {"_target_": "ldm.models.text_encoder.CLIPTextEncoder.from_tiny"}


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """An empty hub cache, offline mode off, and every connection recorded (and refused)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield attempts
    assert attempts == [], f"a file made ldm connect to {attempts}"


def checkpoint(path, text_encoder, **ldm):
    model = {"unet": UNET, "autoencoder": AE, "text_encoder": text_encoder, **ldm.pop("model", {})}
    torch.save({"state_dict": {"unet.x": torch.zeros(1)}, "global_step": 1,
                "ldm": {"model": {"model": model, "schedule": SCHEDULE}, **ldm}}, path)
    return path


def test_a_stored_text_encoder_hub_id_is_not_fetched(tmp_path, no_network):
    from ldm.formats.load import load_bundle

    path = checkpoint(tmp_path / "downloaded.ckpt", HUB_TEXT)
    with pytest.raises(CheckpointError, match="not on this machine") as err:
        load_bundle(path)
    message = str(err.value)
    assert "downloaded.ckpt" in message and "someone/text-encoder-from-a-forum" in message
    assert "huggingface-cli download" in message


def test_a_lora_runs_hub_base_is_not_fetched(tmp_path, no_network):
    from ldm.formats.load import load_bundle

    path = checkpoint(tmp_path / "lora_run.ckpt", TINY_TEXT, model={"pretrained": "someone/base-model"},
                      adapter={"rank": 4})
    with pytest.raises(CheckpointError, match="not on this machine") as err:
        load_bundle(path)
    assert "lora_run.ckpt" in str(err.value) and "ldm.model.model.pretrained" in str(err.value)
