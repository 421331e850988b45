"""The evaluation set: the first n validation items, read from map-style or iterable datasets, split into
per-process shares that cover it exactly once; items without pixels (cached latents) rule out FID / KID."""

import pytest
import torch
from torch.utils.data import IterableDataset, Subset

from ldm.evaluation.eval_set import first_items, generate_share, prompt_checker, share
from ldm.evaluation.metrics import build_image_metrics
from ldm.tasks.shapes.dataset import ShapesDataset
from tests.helpers.evaluation import SmallExtractor


def test_shares_cover_the_set_once():
    for n, world in ((8, 2), (7, 3), (5, 5), (64, 4)):
        parts = [list(share(n, r, world)) for r in range(world)]
        assert sum(parts, []) == list(range(n))


def test_first_items_of_a_map_style_dataset_are_read_again_on_demand():
    val = ShapesDataset(size=10, resolution=16, seed=1)
    items = first_items(val, 4)
    assert len(items) == 4 and items.captions == [val[i]["caption"] for i in range(4)]
    assert items.has_images and items.resolution == (16, 16)
    assert torch.equal(items.images(1, 3), torch.stack([val[1]["image"], val[2]["image"]]))
    assert prompt_checker(val) is not None and prompt_checker([]) is None
    assert len(first_items(val, 50)) == 10


def test_first_items_of_an_iterable_dataset_are_kept():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(100):
                yield {"caption": f"item {i}", "image": torch.full((3, 8, 8), i / 100)}

    items = first_items(Stream(), 3)
    assert items.captions == ["item 0", "item 1", "item 2"]
    assert items.images(2, 3)[0, 0, 0, 0] == 0.02


def test_cached_latents_rule_out_fid_and_kid():
    items = first_items([{"caption": "a red circle", "latents": torch.zeros(4, 2, 2)}] * 3, 3)
    assert not items.has_images and items.resolution is None
    metrics = build_image_metrics(["fid", "kid"], feature_extractor=SmallExtractor(), n_images=3,
                                  real_images=items.has_images)
    assert not metrics and "cached latents" in metrics.skipped["kid"]


def test_generated_batches_are_seeded_by_their_first_global_index():
    seen = []
    batches = list(generate_share(lambda p, s: seen.append((p, s)) or torch.zeros(len(p), 3, 2, 2),
                                  [f"p{i}" for i in range(10)], range(5, 10), batch_size=2, seed=100))
    assert seen == [(["p5", "p6"], 105), (["p7", "p8"], 107), (["p9"], 109)]
    assert [len(images) for _, images in batches] == [2, 2, 1]


def test_prompt_accuracy_scores_with_whatever_checker_the_dataset_offers():
    class SignChecker:  # one aspect: is the image bright where the caption says "plus"?
        aspects = ("sign",)

        def hits(self, images, captions):
            return {"sign": sum(bool(im.mean() > 0) == (c == "plus") for im, c in zip(images, captions))}

    class Signs(list):
        def checker(self):
            return SignChecker()

    val = Signs([{"caption": "plus", "image": torch.ones(3, 4, 4)}] * 2)
    metrics = build_image_metrics(["prompt_accuracy"], checker=prompt_checker(Subset(val, [0, 1])))
    metrics.update_generated(torch.stack([torch.ones(3, 4, 4), -torch.ones(3, 4, 4), torch.ones(3, 4, 4)]),
                             ["plus", "plus", "minus"])
    assert metrics.compute() == {"prompt_sign_acc": pytest.approx(1 / 3)}
    with pytest.raises(TypeError, match="aspects"):
        build_image_metrics(["prompt_accuracy"], checker=object())
