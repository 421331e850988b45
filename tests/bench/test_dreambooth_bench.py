"""bench/dreambooth_shapes.py end to end on a tiny base (slow): instance folder, class images from the base,
DreamBooth fine-tune, before/after scores of the concept and the old prompts."""

import pytest

from tests.helpers.bench import bench_module, tiny_base
from tests.helpers.training import CKPT


@pytest.mark.slow
def test_dreambooth_shapes_bench(capsys, tmp_path):
    from tests.helpers.training import TINY_MODEL

    base = tiny_base(tmp_path)
    tiny = [o for o in TINY_MODEL if not o.startswith(("trainer.", "callbacks=", "data.batch_size", "data.train.res"))]
    row = bench_module("dreambooth_shapes").main(
        ["--base", base, "--out", str(tmp_path / "db"), "--n-instance", "3", "--per-prompt", "1", "--per-concept",
         "2", "--", *tiny, "data.train.resolution=16", "trainer.max_steps=2", "data.batch_size=2",
         "data.train.num_class_images=3", "class_images.batch_size=3", "sampler.steps=2", "callbacks=none",
         *CKPT])
    out = capsys.readouterr().out
    assert "| instance prompt (x2) |" in out and "| old prompts (x18) |" in out
    assert len(list((tmp_path / "db" / "class_images").glob("*.png"))) == 3
    for when in ("before", "after"):
        assert row[when]["sks x other shapes/backgrounds"]["n"] == 12  # 3 shapes x 4 (cycling backgrounds)
        assert row[when]["old prompts"]["n"] == 18 and 0 <= row[when]["old prompts"]["color_acc"] <= 1
