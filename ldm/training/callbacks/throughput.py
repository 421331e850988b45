"""Training throughput (images/s over all ranks), logged every step and reported at the end of the run."""

from __future__ import annotations

from typing import Any

from ldm.training.callbacks.result import ResultCallback


class ThroughputCallback(ResultCallback):
    """Logs training throughput (images/s over all ranks) from the wall time between batch ends."""

    def __init__(self):
        self._last: float | None = None
        self.images, self.seconds = 0, 0.0  # totals since the first batch (for the end-of-run summary)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        now = time.perf_counter()
        if self._last is not None:
            n = len(batch["caption"]) * trainer.world_size
            pl_module.log("train/images_per_sec", n / max(now - self._last, 1e-9), batch_size=1)
            self.images, self.seconds = self.images + n, self.seconds + (now - self._last)
        self._last = now

    @property
    def images_per_sec(self) -> float | None:
        """Mean over the run (sampling and checkpoint pauses between batches included)."""
        return self.images / self.seconds if self.seconds > 0 else None

    def result(self) -> dict[str, Any]:
        return {"images_per_sec": self.images_per_sec} if self.images_per_sec else {}
