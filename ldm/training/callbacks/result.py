"""The one way a callback reports what it found to ``train(cfg)``'s result (a sample grid, prompt accuracy, the VAE
check, throughput): ``result()``, merged into the dict ``train`` returns and summarised at the end of the run."""

from __future__ import annotations

from typing import Any

import lightning as L


class ResultCallback(L.Callback):
    def result(self) -> dict[str, Any]:
        """Entries for train()'s result once fitting ends ({} when there is nothing to report)."""
        return {}
