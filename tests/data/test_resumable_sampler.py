import pytest

from ldm.data import resumable_sampler
from ldm.data.resumable_sampler import ResumableSampler


def test_order_depends_on_seed_and_epoch_only():
    a, b = ResumableSampler(20, seed=1), ResumableSampler(20, seed=1)
    assert list(a) == list(b) and sorted(a) == list(range(20))
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_skip_resumes_mid_epoch_once():
    s = ResumableSampler(20, seed=3)
    full = list(s)
    s.skip(8)
    assert list(s) == full[8:]
    assert list(s) == full  # the skip applies to one iteration only
    assert len(s) == 20  # the full epoch: the trainer's restored batch counter ends the epoch


def test_ranks_split_each_epoch_disjointly(monkeypatch):
    seen = []
    for rank in range(3):
        monkeypatch.setattr(resumable_sampler, "_rank_world", lambda r=rank: (r, 3))
        s = ResumableSampler(31, seed=0)
        s.skip(6)  # 2 batches of 1 per rank already done
        part = list(s)
        assert len(s) == 10
        seen += part
    full = ResumableSampler(31, seed=0).order()[:30].tolist()
    assert sorted(seen) == sorted(full[6:]) and len(set(seen)) == len(seen)


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        ResumableSampler(0)
