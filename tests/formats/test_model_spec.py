"""The metadata kohya sd-scripts writes (ldm/formats/model_spec.py): modelspec.* as library/sai_model_spec.py makes it
(read at sd-scripts 48d368f) and the sshs_* hashes of library/train_util.py precalculate_safetensors_hashes, checked
against a re-implementation here that builds the safetensors bytes by hand from the format's spec."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from ldm.formats.lora_files import save_lora_file
from ldm.formats.model_spec import model_spec, sshs_hashes
from ldm.models.lora import LoRAConfig, LoRANetwork
from ldm.models.unet import UNet
from tests.helpers.models import randomize

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
DTYPE_ORDER = ["F16", "BF16", "F32", "I64"]  # safetensors' Dtype enum order (F16 < BF16 < F32 < ... < I64)


def reference_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sd-scripts' algorithm, independently: the file safetensors would write for ``tensors`` with only the ss_*
    metadata is 8 bytes of little-endian header length n, n bytes of JSON header (compact, padded with spaces to
    a multiple of 8), then every tensor's raw little-endian bytes, largest dtype first and by name within one.
    sshs_model_hash = sha256(data section).hexdigest(); sshs_legacy_hash = sha256(file[1 MiB : 1 MiB + 64 KiB])
    .hexdigest()[:8]. The metadata's order in the header varies between processes (a Rust HashMap), its length
    does not, so neither hash depends on it."""
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    names = sorted(tensors, key=lambda k: (-DTYPE_ORDER.index(SAFETENSORS_DTYPES[tensors[k].dtype]), k))
    header, data, offset = {"__metadata__": ss}, b"", 0
    for name in names:
        t = tensors[name].contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    whole = len(text).to_bytes(8, "little") + text + data
    return {"sshs_model_hash": hashlib.sha256(data).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(whole[0x100000:0x110000]).hexdigest()[:8]}


def test_the_hashes_follow_sd_scripts_algorithm_past_the_first_mebibyte():
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(300_000, generator=g),  # 1.2 MB: the legacy window
               "lora_unet_x.lora_up.weight": torch.randn(7, 3, generator=g), "lora_unet_x.alpha": torch.tensor(4.0),
               "half": torch.randn(5, generator=g).half(), "brain": torch.randn(3, generator=g).bfloat16()}
    meta = {"ss_network_dim": "4", "ss_network_args": json.dumps({"conv_dim": "2"}), "ss_note": "größe",
            "modelspec.title": "left out of the hash", "sshs_model_hash": "left out too"}
    ours = sshs_hashes(tensors, meta)
    assert ours == reference_hashes(tensors, meta)
    assert ours["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]  # the window holds data
    # user metadata (modelspec.*) does not change them; a training key does (through the header's length)
    assert sshs_hashes(tensors, {**meta, "modelspec.title": "another"}) == ours
    changed = sshs_hashes(tensors, {**meta, "ss_note": "a much longer training note"})
    assert changed["sshs_model_hash"] == ours["sshs_model_hash"] and changed["sshs_legacy_hash"] != ours[
        "sshs_legacy_hash"]


def lora(rank=2, seed=0):
    unet = randomize(UNet.from_preset("tiny"), 1)
    torch.manual_seed(seed)
    net = LoRANetwork.build({"unet": unet}, LoRAConfig(rank=rank, preset="attention"))
    with torch.no_grad():
        for m in net.loras.values():
            m.up.weight.normal_(0, 0.1)
    return net, {"unet": unet}


@pytest.mark.parametrize("prediction,expected", [("epsilon", "epsilon"), ("v_prediction", "v")])
def test_a_kohya_lora_carries_sd_scripts_keys(tmp_path, prediction, expected):
    net, roots = lora()
    path = save_lora_file(net, roots, tmp_path / "l.safetensors", prediction_type=prediction, resolution=64,
                          metadata={"modelspec.author": "me"})
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    # sai_model_spec.py: BASE_METADATA / determine_implementation (SD1/SD2 LoRA -> "diffusers") / PRED_TYPE_*
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.prediction_type"] == expected
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"  # determine_architecture: v1 has no "-v"
    assert meta["ss_base_model_version"] == ("sd_v1" if expected == "epsilon" else "sd_v1_v")
    assert meta["modelspec.resolution"] == "64x64"
    # the hashes, over the tensors as written and the file's ss_* keys
    assert {k: meta[k] for k in ("sshs_model_hash", "sshs_legacy_hash")} == reference_hashes(tensors, meta)
    raw = path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # a file under 1 MiB: an empty window


def test_the_peft_layout_gets_no_sshs_keys(tmp_path):
    net, roots = lora()
    path = save_lora_file(net, roots, tmp_path / "peft", layout="peft")
    with safe_open(str(path), "pt") as f:
        assert not any(k.startswith("sshs_") for k in f.metadata())


def test_model_spec_for_each_base_and_adapter():
    sd2v = model_spec("sd_v2_v", "lora", title="t")
    assert (sd2v["modelspec.architecture"], sd2v["modelspec.implementation"], sd2v["modelspec.prediction_type"]) == (
        "stable-diffusion-v2-768-v/lora", "diffusers", "v")
    xl = model_spec("sdxl_base_v1-0", "lora", title="t", resolution=1024)
    assert (xl["modelspec.implementation"], xl["modelspec.resolution"]) == (
        "https://github.com/Stability-AI/generative-models", "1024x1024")
    # determine_implementation: any textual inversion -> Stability's URL
    ti = model_spec("sd_v1", "textual-inversion", title="<tok>")
    assert (ti["modelspec.architecture"], ti["modelspec.implementation"], ti["modelspec.title"]) == (
        "stable-diffusion-v1/textual-inversion", "https://github.com/Stability-AI/generative-models", "<tok>")
    assert "modelspec.prediction_type" not in model_spec("sd_v1", "lora", title="t", prediction_type="flow")
    with pytest.raises(ValueError, match="adapter must be one of"):
        model_spec("sd_v1", "controlnet", title="t")
