"""The training progress bar: optimizer steps out of ``trainer.max_steps`` over the whole run.

Runs here are bound by steps (``trainer.max_steps``, ``max_epochs: -1``). Lightning's own bars do not say how far
such a run is: its Rich bar (the default when ``rich`` is installed) shows "Epoch 3/-2" (max_epochs - 1), its tqdm
bar restarts at every epoch with the epoch's batches as total. This bar counts the run's steps (resumed runs start
at their step) and names the epoch in its description; a run bound by epochs keeps Lightning's tqdm bar.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar


class StepProgressBar(TQDMProgressBar):
    """``Training (epoch 3):  40%|####      | 480/1200 [...]``: step N of max_steps."""

    def step_bound(self) -> bool:
        max_steps = self.trainer.max_steps
        return max_steps is not None and max_steps > 0

    @staticmethod
    def train_description_of(epoch: int) -> str:
        return f"Training (epoch {epoch})"

    def _show_step(self, step: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = step
            bar.refresh()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.step_bound():
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = trainer.global_step  # a resumed run: from its step (and its rate
            self._show_step(trainer.global_step)  # counts the steps of this process only)

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        if not self.step_bound():
            super().on_train_epoch_start(trainer, *args)
            return
        self.train_progress_bar.set_description(self.train_description_of(trainer.current_epoch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.step_bound():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        step = trainer.global_step
        if self._should_update(step, trainer.max_steps):
            self._show_step(step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.step_bound():
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:  # one bar for the run: not closed at the end of an epoch
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def default_progress_bar(enabled: bool, callbacks: list[Callback]) -> list[Callback]:
    """[StepProgressBar()] for a trainer that shows a bar (``trainer.enable_progress_bar``) when no configured
    callback is a progress bar already (Lightning takes one at most); else []."""
    if not enabled or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [StepProgressBar()]
