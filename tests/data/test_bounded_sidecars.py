"""Metadata rows and sample sidecars of a downloaded dataset are bounded data (issue 25): JSON nested thousands of
levels deep, or a number of thousands of digits, ends in a clear error naming the file and line (an image folder's
metadata.jsonl) or skips and counts that one sample (a webdataset shard), never a RecursionError."""

import json

import pytest
import webdataset as wds

from ldm.data.image_folder import ImageFolderDataset
from ldm.data.webdataset import WebDatasetSource

DEEP = "[" * 50_000 + "]" * 50_000
HUGE_NUMBER = "1" * 5_000


@pytest.mark.parametrize("row", [DEEP, '{"file_name": "a.png", "text": ' + HUGE_NUMBER + "}"], ids=["deep", "digits"])
def test_a_bad_metadata_row_names_file_and_line(tmp_path, images, row):
    images.save(tmp_path / "a.png")
    images.save(tmp_path / "b.png")
    good = json.dumps({"file_name": "a.png", "text": "x"})
    (tmp_path / "metadata.jsonl").write_text(good + "\n" + row + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_a_deep_json_sidecar_skips_its_sample(tmp_path, images, caplog):
    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as sink:
        sink.write({"__key__": "good", "png": images.bytes(size=(16, 16)), "json": json.dumps({"caption": "ok"})})
        sink.write({"__key__": "bomb", "png": images.bytes(size=(16, 16)), "json": '{"caption": ' + DEEP + "}"})
    samples = list(WebDatasetSource(str(tmp_path / "shard-000.tar"), resolution=8, shuffle_buffer=0))
    assert [s["key"] for s in samples] == ["good"] and samples[0]["caption"] == "ok"
    assert "bomb" in caplog.text and "nested too deeply" in caplog.text


def test_a_saved_table_naming_a_file_outside_its_folder_is_not_read(tmp_path, images):
    import datasets

    from ldm.data.hf_dataset import HFDataset

    private = tmp_path / "home" / "private.png"  # a picture of the user's, named by a table from elsewhere
    private.parent.mkdir()
    images.save(private)
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": images.bytes(), "path": None}, {"bytes": None, "path": str(private)}],
         "text": ["shipped", "stolen"]},
        # a plain struct column: save_to_disk embeds the files of an Image column, a crafted table need not
        features=datasets.Features({"image": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                                    "text": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "downloaded"))
    dataset = HFDataset(str(tmp_path / "downloaded"), resolution=8)
    assert [dataset[i]["caption"] for i in range(2)] == ["shipped", "shipped"]  # the outside row skipped
    assert dataset.bad_files == {"train[1]"}
