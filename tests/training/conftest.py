"""The training tests' fixtures (defined with the helpers they use, tests/helpers/training.py)."""

from tests.helpers.training import tiny_cfg  # noqa: F401 - the fixture, for every test in this folder
