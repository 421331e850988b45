"""Console scripts (pyproject ``[project.scripts]``): ``ldm-train``, ``ldm-sample``, ``ldm-export``.

``ldm-train`` / ``ldm-sample`` run the repository's ``train.py`` / ``sample.py`` (their ``@hydra.main`` reads
``configs/`` next to them), so they need a source checkout installed with ``pip install -e .``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_script(name: str) -> None:
    script = ROOT / name
    if not script.is_file() or not (ROOT / "configs").is_dir():
        raise SystemExit(f"{Path(sys.argv[0]).name}: {script} or {ROOT / 'configs'} not found; these commands run "
                         "from a source checkout installed with `pip install -e .`")
    runpy.run_path(str(script), run_name="__main__")


def train_main() -> None:
    """``ldm-train [overrides...]`` = ``python train.py [overrides...]``."""
    _run_script("train.py")


def sample_main() -> None:
    """``ldm-sample ckpt=... prompt=...`` = ``python sample.py ...``."""
    _run_script("sample.py")


def export_main(argv: list[str] | None = None) -> int:
    """``ldm-export <source> --format ... --out ...`` = ``python -m ldm.cli.export ...``; returns the exit code."""
    from ldm.cli.export import main

    return main(argv, prog="ldm-export")


if __name__ == "__main__":
    sys.exit(export_main())
