import json
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.collate import collate_image_caption
from ldm.data.image_folder import ImageFolderDataset


def captions_by_key(dataset):
    return {dataset[i]["key"]: dataset[i]["caption"] for i in range(len(dataset))}


def test_metadata_jsonl_with_subfolders(tmp_path, images):
    images.save(tmp_path / "a.png")
    images.save(tmp_path / "sub" / "b.jpg", size=(30, 18))
    images.save(tmp_path / "sub" / "deeper" / "c.webp")
    rows = [
        {"file_name": "a.png", "text": "first"},
        {"file_name": "sub/b.jpg", "text": "second"},
        {"file_name": "sub/deeper/c.webp", "text": "third"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = ImageFolderDataset(tmp_path, resolution=16)
    assert len(dataset) == 3
    assert captions_by_key(dataset) == {"a.png": "first", "sub/b.jpg": "second", "sub/deeper/c.webp": "third"}
    sample = dataset[1]
    assert sample["image"].shape == (3, 16, 16) and -1 <= sample["image"].min() <= sample["image"].max() <= 1
    assert dataset.missing_captions == 0
    assert len(list(dataset)) == 3  # plain iteration stops at IndexError
    with pytest.raises(IndexError):
        dataset[3]


def test_metadata_csv_custom_column_and_nested_metadata(tmp_path, images):
    images.save(tmp_path / "x.bmp")
    images.save(tmp_path / "part" / "y.jpeg")
    (tmp_path / "metadata.csv").write_text("file_name,caption,other\nx.bmp,a bitmap,1\n")
    (tmp_path / "part" / "metadata.csv").write_text("file_name,caption,other\ny.jpeg,a jpeg,2\n")
    dataset = ImageFolderDataset(tmp_path, resolution=8, caption_column="caption")
    assert captions_by_key(dataset) == {"x.bmp": "a bitmap", "part/y.jpeg": "a jpeg"}


def test_txt_sidecars_and_missing_captions(tmp_path, images, caplog):
    images.save(tmp_path / "one.png")
    (tmp_path / "one.txt").write_text("  a sidecar caption\n")
    images.save(tmp_path / "two.png")
    (tmp_path / "notes.md").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert captions_by_key(dataset) == {"one.png": "a sidecar caption", "two.png": ""}
    assert dataset.missing_captions == 1
    assert "1 of 2 images have no caption" in caplog.text


def test_missing_caption_column_lists_columns(tmp_path, images):
    images.save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"'text'.*available columns: \['file_name', 'prompt'\]"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_metadata_pointing_at_missing_file(tmp_path, images):
    images.save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_missing_or_empty_root_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images.*empty"):
        ImageFolderDataset(tmp_path / "empty", resolution=8)


def test_corrupt_and_truncated_files_are_skipped_once(tmp_path, images, caplog):
    for name in ("a.png", "c.png", "e.png"):
        images.save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(np.random.default_rng(0).bytes(1024))  # random bytes
    whole = images.bytes(size=(32, 32))
    (tmp_path / "d.png").write_bytes(whole[: len(whole) // 2])  # truncated
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert len(dataset) == 5
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        loader = DataLoader(dataset, batch_size=2, collate_fn=collate_image_caption)
        keys = [k for _ in range(2) for batch in loader for k in batch["key"]]  # two epochs
    assert set(keys) == {"a.png", "c.png", "e.png"}
    assert len(keys) == 10  # bad indices were replaced by the next good file
    assert dataset.bad_files == {"b.png", "d.png"}
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warnings) == 2  # once per bad file, not per access
    assert any("b.png" in w for w in warnings) and any("d.png" in w for w in warnings)
    assert dataset[1]["key"] == "c.png"


def test_all_files_bad_raises(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(RuntimeError, match="could be decoded"):
        dataset[0]


def test_collate(tmp_path, images):
    for i in range(3):
        images.save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    batch = collate_image_caption([ImageFolderDataset(tmp_path, resolution=8)[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 8, 8)
    assert batch["caption"] == ["caption 0", "caption 1", "caption 2"]
    assert torch.equal(batch["index"], torch.tensor([0, 1, 2]))
