"""sample.py prompt_file=: each prompt's images are made with the settings of its line (kohya's --n --w --h --d --l
--s --ss), and each PNG records them."""

import numpy as np
import pytest
from PIL import Image

from ldm.pipelines.cli import SampleConfigError, sample
from ldm.pipelines.png import read_parameters
from tests.helpers.sample import config, model, no_loader, pictures  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_each_prompt_takes_the_settings_of_its_line(model, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya's format\na red circle\na blue square --n red --w 8 --h 12 --d 9 --l 3 --s 2 "
                       "--ss euler_a\n")
    paths = sample(config(model, tmp_path / "out", f"prompt_file={prompts}", "n_images=2", "batch_size=2"))
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png"]
    params = [read_parameters(p) for p in paths[:4]]
    assert [(p["prompt"], p["size"], p["seed"], p["sampler"], p["steps"], p["cfg_scale"], p["negative_prompt"])
            for p in params] == [("a red circle", "16x16", 0, "ddim", 3, 7.5, ""),
                                 ("a red circle", "16x16", 0, "ddim", 3, 7.5, ""),
                                 ("a blue square", "8x12", 9, "euler_ancestral", 2, 3.0, "red"),
                                 ("a blue square", "8x12", 9, "euler_ancestral", 2, 3.0, "red")]
    assert Image.open(paths[2]).size == (8, 12)
    alone = sample(config(model, tmp_path / "alone", "prompt='a blue square'", "negative_prompt=red", "width=8",
                          "height=12", "seed=9", "guidance_scale=3", "sampler=euler_ancestral", "sampler.steps=2",
                          "n_images=2", "batch_size=2"))
    assert np.array_equal(pixels(paths[2]), pixels(alone[0])) and np.array_equal(pixels(paths[3]), pixels(alone[1]))
    assert Image.open(paths[-1]).size[0] >= 16 + 8  # the grid holds the prompts' images of both sizes


def test_a_plain_file_samples_as_before(model, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    listed = sample(config(model, tmp_path / "file", f"prompt_file={prompts}", "n_images=2", "batch_size=3"))
    assert [read_parameters(p)["seed"] for p in listed[:4]] == [0, 0, 0, 3]  # batches of 3 across the prompts


def test_a_size_the_model_cannot_take_names_the_line(model, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square --w 10\n")
    with pytest.raises(SampleConfigError, match=r"prompt_file: .*prompts.txt:2: height/width: height and width must "
                                                r"be positive multiples of 4"):
        sample(config(model, tmp_path / "out", f"prompt_file={prompts}"))


@pytest.mark.parametrize("line, match", [
    ("a cat --am 0.5", r"prompt_file: .*prompts.txt:1: kohya's --am .* is not supported"),
    ("a cat --s 1001", r"prompt_file: .*prompts.txt:1: --s '1001': must be a whole number from 1 to 1000"),
])
def test_a_bad_line_fails_before_the_model_loads(model, tmp_path, monkeypatch, line, match):  # noqa: F811
    import ldm.pipelines.cli as cli

    monkeypatch.setattr(cli, "load_bundle", no_loader)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(line + "\n")
    with pytest.raises(SampleConfigError, match=match):
        sample(config(model, tmp_path / "out", f"prompt_file={prompts}"))


def test_sizes_in_the_file_and_an_init_image_are_refused(model, pictures, tmp_path, monkeypatch):  # noqa: F811
    import ldm.pipelines.cli as cli

    monkeypatch.setattr(cli, "load_bundle", no_loader)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --h 8\n")
    with pytest.raises(SampleConfigError, match=r"prompts.txt:1: --w/--h cannot be used with init_image"):
        sample(config(model, tmp_path / "out", f"prompt_file={prompts}", f"init_image={pictures / 'init.png'}"))
