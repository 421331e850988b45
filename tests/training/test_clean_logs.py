"""What a user sees while training: the progress bar counts the run's steps (not Lightning's "Epoch 3/-2"),
Lightning's product tips stay out of the log while its real messages and warnings remain, and the files a run
writes hold plain data (no Python object reprs)."""

import json
import logging
import warnings

import lightning as L
import pytest
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from ldm.data.latent_cache import MANIFEST
from ldm.training.build.loggers import LIGHTNING_RANK_ZERO_LOGGERS, LightningTipFilter, quiet_lightning_tips
from ldm.training.callbacks.progress import StepProgressBar, default_progress_bar
from ldm.training.run.train import build_callbacks, train
from tests.helpers.training import TINY_MODEL, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")


def fit_boring(tmp_path, bar, **trainer_args):
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", **trainer_args)
    trainer.fit(BoringModel())
    return str(bar.train_progress_bar)


def test_a_step_bound_run_shows_step_n_of_max_steps(tmp_path):
    shown = fit_boring(tmp_path, StepProgressBar(), max_steps=7, max_epochs=-1, limit_train_batches=3)
    assert shown.startswith("Training (epoch 2): 100%") and "| 7/7 [" in shown  # 3 epochs of 3, 3 and 1 steps
    assert "/-" not in shown


def test_an_epoch_bound_run_keeps_lightnings_bar(tmp_path):
    shown = fit_boring(tmp_path, StepProgressBar(), max_epochs=2, limit_train_batches=3)
    assert shown.startswith("Epoch 1: 100%") and "| 3/3 [" in shown


def test_a_resumed_run_starts_at_its_step(tmp_path):
    class Resumed(StepProgressBar):  # the bar as a run resumed at step 480 of 1200 draws it
        def on_train_start(self, trainer, pl_module):
            trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = 480
            super().on_train_start(trainer, pl_module)
            self.at_start = str(self.train_progress_bar)
            trainer.should_stop = True  # no step needed

    bar = Resumed()
    fit_boring(tmp_path, bar, max_steps=1200, max_epochs=-1)
    assert "  40%" in bar.at_start and "| 480/1200 [" in bar.at_start


def test_train_uses_the_step_bar_unless_the_bar_is_off_or_given(tmp_path):
    on = compose_train(tmp_path, TINY_MODEL + ["trainer.enable_progress_bar=true"])
    assert sum(isinstance(c, StepProgressBar) for c in build_callbacks(on, None, tmp_path)) == 1
    off = compose_train(tmp_path, TINY_MODEL)  # enable_progress_bar=false
    assert not any(isinstance(c, StepProgressBar) for c in build_callbacks(off, None, tmp_path))
    assert default_progress_bar(True, [TQDMProgressBar()]) == []  # a configured bar wins: Lightning takes one


def test_the_tip_filter_drops_only_lightnings_tips():
    def passes(message: str) -> bool:
        return LightningTipFilter().filter(logging.LogRecord("x", logging.INFO, "", 0, message, None, None))

    assert not passes("💡 Tip: For seamless cloud logging and experiment tracking, try installing "
                      "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, ...")
    assert not passes("💡 Tip: For seamless cloud uploads and versioning, try installing "
                      "[litmodels](https://pypi.org/project/litmodels/) to enable LitModelCheckpoint, ...")
    for message in ("GPU available: False, used: False", "`Trainer.fit` stopped: `max_steps=3` reached.",
                    "Tip of the day: the loss went up"):
        assert passes(message)


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def remove_tip_filters():
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, LightningTipFilter)]:
            logger.removeFilter(f)


def test_quiet_lightning_tips_is_idempotent():
    remove_tip_filters()
    quiet_lightning_tips()
    quiet_lightning_tips()
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        assert sum(isinstance(f, LightningTipFilter) for f in logging.getLogger(name).filters) == 1


def test_a_training_run_logs_no_lightning_tips(tmp_path, capfd):
    remove_tip_filters()  # train() itself must keep the tips out
    recorder = Recorder()  # beside the loggers' filters: what Lightning's own handlers would print
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        logging.getLogger(name).addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # train() puts its own filter in front of this one
            train(compose_train(tmp_path, TINY_MODEL + ["trainer.enable_progress_bar=true"]))
    finally:
        for name in LIGHTNING_RANK_ZERO_LOGGERS:
            logging.getLogger(name).removeHandler(recorder)
    out, err = capfd.readouterr()
    for text in [out, err, *recorder.messages]:
        for word in ("Tip", "litmodels", "litlogger", "LitLogger", "lightning.ai"):
            assert word not in text
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]  # frozen parts
    assert any(m.startswith("GPU available:") for m in recorder.messages)  # Lightning's real messages remain
    assert "Training (epoch 0): 100%" in out and "3/3" in out  # the step bar, on stdout


def test_a_training_runs_cache_manifest_describes_the_data_plainly(tiny_cfg, tmp_path):
    train(tiny_cfg("++data.latent_cache=${paths.cache_dir}/latents", f"paths.cache_dir={tmp_path / 'cache'}",
                   "data.train.size=8", "trainer.max_steps=1"))
    (manifest_file,) = (tmp_path / "cache" / "latents").glob(f"*/part-*/{MANIFEST}")
    text = manifest_file.read_text()
    assert "object at 0x" not in text and str(tmp_path) not in text
    manifest = json.loads(text)
    assert manifest["source"] == "ShapesDataset"
    assert manifest["description"]["dataset"]["kind"] == "ShapesDataset"
