"""Helpers that several test modules share: tiny models, composed configs, command lines, stand-ins.

Test modules import them from here, never from another test module or a conftest (pytest imports those under
their own names too, so an import from them builds a second copy of the module and its fixtures)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: train.py, sample.py, configs/
CONFIGS = str(ROOT / "configs")
