"""The benchmark scripts as modules, and the tiny base their "teach it something new" runs start from."""

import importlib
import sys

from tests.helpers import ROOT


def bench_module(name):
    """bench.NAME (a package, so that bench/sample.py is not confused with the repo's sample.py)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"bench.{name}")


def tiny_base(tmp_path) -> str:
    """The last checkpoint of a 2-step tiny base run: the --base of the "teach it something new" benches."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.training import CKPT, TINY_MODEL, compose_train
    from ldm.training.run.train import train

    return train(compose_train(tmp_path / "base", TINY_MODEL + CKPT + ["trainer.max_steps=2"]))[
        "last_checkpoint"]
