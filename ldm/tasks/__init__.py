"""Self-contained tasks: a dataset, how to check a model trained on it, and the benchmark numbers it gives."""
