import datasets
import pytest

from ldm.data.hf_dataset import HFDataset, is_saved_dataset


@pytest.fixture
def saved_dataset(tmp_path, images):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    table = datasets.Dataset.from_dict(
        {"image": [images.make(size=(20, 16), color=c) for c in colours], "text": ["red", "green", "blue"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    path = tmp_path / "saved"
    table.save_to_disk(str(path))
    return path


def test_load_saved_dataset(saved_dataset):
    assert is_saved_dataset(saved_dataset)
    dataset = HFDataset(str(saved_dataset), resolution=16)
    assert len(dataset) == 3
    sample = dataset[1]
    assert sample["caption"] == "green" and sample["index"] == 1
    assert sample["image"].shape == (3, 16, 16)
    assert sample["image"][1, -1, -1] == 1.0  # green channel of the bottom-right pixel


def test_saved_dataset_dict_picks_split(tmp_path, images):
    table = datasets.Dataset.from_dict({"img": [images.make()], "caption": [["first", "second"]]})
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "dd"))
    dataset = HFDataset(str(tmp_path / "dd"), split="test", image_column="img", caption_column="caption", resolution=8)
    assert dataset[0]["caption"] == "first"
    with pytest.raises(ValueError, match=r"available splits: \['train', 'test'\]"):
        HFDataset(str(tmp_path / "dd"), split="validation", image_column="img", resolution=8)


def test_missing_column_lists_available(saved_dataset):
    with pytest.raises(ValueError, match=r"\['caption'\].*available columns: \['image', 'text'\]"):
        HFDataset(str(saved_dataset), caption_column="caption", resolution=8)


def test_load_dataset_for_plain_folder(tmp_path, images):
    folder = tmp_path / "imagefolder"
    for i in range(2):
        images.save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "0.png", "text": "zero"}\n{"file_name": "1.png", "text": "one"}\n'
    )
    dataset = HFDataset(str(folder), resolution=8, cache_dir=str(tmp_path / "cache"))
    assert sorted(dataset[i]["caption"] for i in range(2)) == ["one", "zero"]


def test_corrupt_image_bytes_are_skipped(tmp_path, images):
    good = {"bytes": images.bytes(), "path": None}
    bad = {"bytes": b"garbage", "path": None}
    table = datasets.Dataset.from_dict(
        {"image": [good, bad, good], "text": ["a", "b", "c"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    table.save_to_disk(str(tmp_path / "ds"))
    dataset = HFDataset(str(tmp_path / "ds"), resolution=8)
    assert [dataset[i]["caption"] for i in range(3)] == ["a", "c", "c"]
    assert dataset.bad_files == {"train[1]"}


def test_the_automatic_cache_reuses_a_saved_dataset_and_rebuilds_when_it_changes(saved_dataset, tmp_path, images):
    from ldm.data.auto_cache import cache_spec, sync_cache
    from tests.helpers.data import CountingEncoder

    enc = CountingEncoder()
    view = sync_cache(tmp_path / "cache", cache_spec(HFDataset(str(saved_dataset), resolution=16)), enc,
                      progress=False)
    assert enc.images == 3 and [view[i]["caption"] for i in range(3)] == ["red", "green", "blue"]
    enc = CountingEncoder()
    sync_cache(tmp_path / "cache", cache_spec(HFDataset(str(saved_dataset), resolution=16)), enc, progress=False)
    assert enc.calls == 0
    changed = datasets.Dataset.from_dict({"image": [images.make(size=(16, 16))], "text": ["new"]},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "text": datasets.Value("string")}))
    changed.save_to_disk(str(tmp_path / "other"))
    enc = CountingEncoder()
    view = sync_cache(tmp_path / "cache", cache_spec(HFDataset(str(tmp_path / "other"), resolution=16)), enc,
                      progress=False)
    assert enc.images == 1 and len(view) == 1 and view[0]["caption"] == "new"
