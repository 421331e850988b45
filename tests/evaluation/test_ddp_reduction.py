"""The metrics reduce across processes: 2 CPU processes (gloo), each scoring half of the evaluation set, get the
single-process value on the whole set, for every metric."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.evaluation.eval_set import first_items, prompt_checker
from ldm.evaluation.metrics import build_image_metrics, score_share
from ldm.tasks.shapes.dataset import ShapesDataset
from tests.helpers.evaluation import SmallExtractor

N, BATCH = 8, 2


def _score(clip_folder: str, rank: int = 0, world_size: int = 1) -> dict:
    """FID, KID, CLIP score and prompt accuracy of 'generated' images: the validation images of the prompts with
    seeded noise (so every batch is the same whichever process makes it)."""
    val = ShapesDataset(size=N, resolution=16, seed=1)
    items = first_items(val, N)
    metrics = build_image_metrics(["fid", "kid", "clip_score", "prompt_accuracy"], feature_extractor=SmallExtractor(),
                                  clip_model=clip_folder, n_images=N, kid_subset_size=4, kid_subsets=10,
                                  checker=prompt_checker(val), kid_seed=3)
    assert not metrics.skipped, metrics.skipped

    def generate(prompts, seed):  # batch starting at item i is seeded with seed + i (seed = 100)
        start = seed - 100
        g = torch.Generator().manual_seed(seed)
        noise = 0.3 * torch.randn(len(prompts), 3, 16, 16, generator=g)
        return (items.images(start, start + len(prompts)) + noise).clamp(-1, 1)

    return score_share(metrics, items, generate, rank=rank, world_size=world_size, batch_size=BATCH, seed=100)


def _worker(rank: int, world_size: int, init_file: str, clip_folder: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        values = _score(clip_folder, rank, world_size)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(values, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_values(tmp_path, clip_folder):
    # fork: the workers start with everything already imported (spawn would re-import torch and transformers);
    # each worker runs single-threaded, so no OpenMP pool is shared across the fork
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(clip_folder), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    single = _score(str(clip_folder))
    assert set(single) == {"fid", "kid", "kid_std", "clip_score", "prompt_color_acc", "prompt_shape_acc"}
    assert single["fid"] > 0 and single["prompt_color_acc"] > 0
    for rank in (0, 1):
        ranked = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ranked.keys() == single.keys()
        for key, value in single.items():
            assert abs(ranked[key] - value) <= 1e-5 * max(1.0, abs(value)), (rank, key, ranked[key], value)
