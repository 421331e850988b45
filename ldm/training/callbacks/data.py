"""Callbacks every run has for its data: the dataset's epoch (webdataset shard order, latent-cache posterior
draws) and the count of unreadable samples skipped."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from ldm.data.datamodule import set_dataset_epoch


class DatasetEpochCallback(L.Callback):
    """Tells the training dataset which epoch starts when it has ``set_epoch``: webdataset shards change their
    order and shuffle, a latent cache draws new posterior samples. Lightning only calls set_epoch on samplers."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        ds = getattr(dm, "train_dataset", None) if dm is not None else None
        if ds is not None:
            set_dataset_epoch(ds, trainer.current_epoch)


class BadSamplesCallback(L.Callback):
    """Logs ``data/bad_samples``: the unreadable samples skipped so far in this run, each counted once across
    DataLoader workers, ranks and resumes (the marker files of ``ldm.data.bad_samples`` in ``folder``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def count(self) -> int:
        return len(list(self.folder.glob("*.txt"))) if self.folder.is_dir() else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("data/bad_samples", float(self.count()), batch_size=1)
