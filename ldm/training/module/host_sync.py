"""The places where a training step may copy a value from the device to the host.

On a GPU, reading a value the step computed (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, a blocking
``.cpu()``) waits for every kernel queued before it: the host stops feeding the GPU, which then idles until the next
kernels arrive. The training step therefore decides everything on the device (the divergence guard's verdict,
the skipped update, the EMA weight) and reads its results back only at the points named here, each wrapped in
``host_sync_point(name)`` so that tests/training/test_host_syncs.py can tell them from a stray sync:

- ``REPORT``: the divergence guard's verdicts (the logged loss, ``train/nonfinite_steps``, the stop after
  ``module.max_nonfinite_steps`` skipped steps in a row), once every ``trainer.log_every_n_steps`` steps, at the
  last step of an epoch and of the run (Lightning converts its logged tensors at the same steps);
- ``CHECKPOINT``: writing a checkpoint, which copies every weight to the host anyway;
- ``HOST_SKIP``: an optimizer that cannot skip an update on the device (see ``guarded_update``) gets its verdict
  on the host, every step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

REPORT = "report: the divergence guard's verdicts at a logging step"
CHECKPOINT = "checkpoint: the guard's state and the weights' check before writing"
HOST_SKIP = "host skip: the optimizer cannot skip an update on the device"

_active: list[str] = []


@contextmanager
def host_sync_point(name: str) -> Iterator[None]:
    """Mark the block as one of the documented host sync points."""
    _active.append(name)
    try:
        yield
    finally:
        _active.pop()


def active_sync_point() -> str | None:
    """The innermost documented sync point being run, or None."""
    return _active[-1] if _active else None
