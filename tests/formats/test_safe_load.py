"""Safe checkpoint reading and all-or-nothing loading."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldm.formats.safe_load import CheckpointError, load_into, load_state_dict

STATE = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}


def _marker_writer(path):  # pragma: no cover - must never run
    open(path, "w").close()


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_marker_writer, (self.marker,))


def test_reads_safetensors_and_ckpt(tmp_path):
    save_file(STATE, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": STATE, "epoch": 3, "global_step": 10}, tmp_path / "m.ckpt")
    torch.save(STATE, tmp_path / "m.bin")
    for name in ["m.safetensors", "m.ckpt", "m.bin"]:
        got = load_state_dict(tmp_path / name)
        assert got.keys() == STATE.keys() and all(torch.equal(got[k], STATE[k]) for k in STATE)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_and_corrupt_files(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    big = {"w": torch.randn(64, 64)}
    save_file(big, str(path)) if suffix == ".safetensors" else torch.save(big, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model" + suffix.replace(".", r"\.")) as err:
        load_state_dict(path)
    assert "corrupt or truncated" in str(err.value)
    path.write_bytes(b"\x07garbage" * 100)
    with pytest.raises(CheckpointError, match="model" + suffix.replace(".", r"\.")) as err:
        load_state_dict(path)
    assert "corrupt or truncated" in str(err.value)


def test_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": STATE, "payload": Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="evil.ckpt: refused to unpickle non-tensor object .*_marker_writer"):
        load_state_dict(path)
    assert not marker.exists()


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "m.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_state_dict(tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.safetensors")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_load_into_reports_everything_and_copies_nothing():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = {
        "0.weight": torch.zeros(4, 3),  # fits
        "0.bias": torch.zeros(5),  # mis-shaped
        "2.weight": torch.zeros(1),  # unexpected
    }  # 1.weight / 1.bias missing
    with pytest.raises(CheckpointError) as err:
        load_into(net, bad, source="ckpt/some.safetensors")
    msg = str(err.value)
    assert "ckpt/some.safetensors" in msg
    assert "2 missing keys" in msg and "1.weight" in msg and "1.bias" in msg
    assert "1 unexpected keys" in msg and "2.weight" in msg
    assert "1 mis-shaped keys" in msg and "0.bias: checkpoint (5,) vs model (4,)" in msg
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_load_into_non_strict_and_success():
    net = _net()
    missing, unexpected = load_into(net, {"0.bias": torch.ones(4), "x": torch.ones(1)}, source="s", strict=False)
    assert missing == ["0.weight", "1.weight", "1.bias"] and unexpected == ["x"]
    assert torch.equal(net[0].bias, torch.ones(4))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_into(net, {"0.bias": torch.ones(3)}, source="s", strict=False)
    full = {k: torch.full_like(v, 2.0) for k, v in net.state_dict().items()}
    assert load_into(net, full, source="s") == ([], [])
    assert all(torch.equal(v, full[k]) for k, v in net.state_dict().items())


def test_long_listings_are_capped():
    net = nn.Linear(2, 2)
    extra = {f"extra.{i}": torch.zeros(1) for i in range(30)}
    with pytest.raises(CheckpointError, match=r"30 unexpected keys(.|\n)*\.\.\. and 10 more"):
        load_into(net, {**net.state_dict(), **extra}, source="s")
