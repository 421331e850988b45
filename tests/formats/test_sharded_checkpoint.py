"""trainer=fsdp2's sharded checkpoint folder (torch.distributed.checkpoint) read as bounded data: the weights and
Lightning's entries come back as one checkpoint dict; an index naming any other class, a piece outside the folder
or past a file's end, and a tensor larger than its stored bytes are refused before anything is built."""

import pickle
from pathlib import Path

import pytest
import torch

from ldm.formats.safe_load import CheckpointError
from ldm.formats.sharded_checkpoint import INDEX, is_sharded_checkpoint, read_sharded_checkpoint


def write_folder(folder: Path) -> dict:
    """A sharded checkpoint as one process writes it (the layout 2 ranks write, with one file)."""
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(0)
    weights = {"unet.w": torch.randn(6, 4, generator=g), "ema.num_updates": torch.tensor(3)}
    dcp.save({"state_dict": weights, "optimizer_0": {"state": {"unet.w": {"exp_avg": torch.ones(6, 4)}},
                                                       "param_groups": [{"lr": 1e-3, "params": ["unet.w"]}]}},
             checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": 7, "ldm": {"kind": "latent_diffusion"}}, folder / "meta.pt")
    return weights


def test_a_sharded_folder_reads_as_one_checkpoint(tmp_path):
    weights = write_folder(tmp_path / "last.ckpt")
    assert is_sharded_checkpoint(tmp_path / "last.ckpt") and not is_sharded_checkpoint(tmp_path)
    ckpt = read_sharded_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 7 and ckpt["ldm"] == {"kind": "latent_diffusion"}
    assert ckpt["state_dict"].keys() == weights.keys()  # the weights only, not the optimizer state
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in weights.items())


class Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_an_index_naming_another_class_is_refused(tmp_path, capsys):
    folder = tmp_path / "last.ckpt"
    write_folder(folder)
    (folder / INDEX).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="builtins.print.*refused"):
        read_sharded_checkpoint(folder)
    assert "unpickled code ran" not in capsys.readouterr().out


def _rewrite_index(folder: Path, change) -> None:
    index = pickle.loads((folder / INDEX).read_bytes())  # our own test file
    change(index)
    (folder / INDEX).write_bytes(pickle.dumps(index))


def test_pieces_outside_the_folder_or_its_bytes_are_refused(tmp_path):
    import dataclasses

    for name, change, match in [
        ("outside", lambda i: [setattr(v, "relative_path", "../x") for v in i.storage_data.values()],
         "not a file of the folder"),
        ("past_end", lambda i: [setattr(v, "offset", v.offset + (1 << 30)) for v in i.storage_data.values()],
         "past its"),
        ("too_large", lambda i: i.state_dict_metadata.__setitem__(
            "state_dict.unet.w", dataclasses.replace(i.state_dict_metadata["state_dict.unet.w"],
                                                     size=torch.Size([1 << 20, 1 << 10]))),
         "holds .* bytes of it"),
    ]:
        folder = tmp_path / name
        write_folder(folder)
        _rewrite_index(folder, change)
        with pytest.raises(CheckpointError, match=match):
            read_sharded_checkpoint(folder)


def test_a_missing_shard_file_is_refused(tmp_path):
    folder = tmp_path / "last.ckpt"
    write_folder(folder)
    for shard in folder.glob("*.distcp"):
        shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_sharded_checkpoint(folder)
