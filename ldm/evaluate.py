"""Evaluate a model: ``python -m ldm.evaluate <checkpoint or export> [data=shapes] [n=64] [key=value ...]``.

Keys and defaults: configs/evaluate.yaml (schema ``ldm.cli.evaluate_config.EvaluateConfig``); the work is done by
``ldm.cli.evaluate.evaluate(cfg)``. Prints the metrics table and where its JSON was written.
"""

from __future__ import annotations

import logging
import sys

USAGE = ("usage: python -m ldm.evaluate <checkpoint or export folder> [data=<configs/data option>] [n=64] "
         "[inception_weights=<file>] [clip_model=<folder>] [key=value ...]   (keys: configs/evaluate.yaml)")


def overrides_from_argv(argv: list[str]) -> list[str]:
    """A leading argument without '=' is the model (ckpt=...); the rest are Hydra overrides."""
    if argv and "=" not in argv[0]:
        return [f"ckpt={argv[0]}", *argv[1:]]
    return list(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    from ldm.cli.evaluate_config import compose_evaluate
    from ldm.cli.evaluate import evaluate, format_table

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = evaluate(compose_evaluate(overrides_from_argv(argv)))
    print(format_table(result))
    print(f"written: {result['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
