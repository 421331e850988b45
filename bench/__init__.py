"""Benchmarks (see bench/README.md). Run the scripts as `python bench/NAME.py` or `python -m bench.NAME`."""
