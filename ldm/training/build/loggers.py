"""Logger factories that need a decision at run time, and what Lightning may write into a run's log."""

from __future__ import annotations

import logging
import os
import warnings

# Lightning 2.6 logs advertisements for its cloud products at every run, as info lines through its rank-zero
# logger: "💡 Tip: For seamless cloud logging ... try installing [litlogger](https://pypi.org/project/litlogger/)"
# (trainer/connectors/logger_connector) and "💡 Tip: For seamless cloud uploads ... [litmodels](...)"
# (trainer/connectors/callback_connector). Its warnings go through `warnings`, not these loggers, and stay, but for
# one: "Found N module(s) in eval mode at the start of training. This may lead to unexpected behavior" (fit_loop
# _warn_if_modules_in_eval_mode), which every run of ours would print: the frozen VAE, text encoder and base are
# in eval mode on purpose (LatentDiffusion.train keeps them so).
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"
LIGHTNING_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                               "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class LightningTipFilter(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing [lit...]" lines; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().lstrip()
        return not (message.startswith("💡") or (message.startswith("Tip:") and "pypi.org/project/lit" in message))


def quiet_lightning_tips() -> None:
    """Keep Lightning's product tips, and its warning about our frozen parts' eval mode, out of the run's log
    (idempotent)."""
    warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, LightningTipFilter) for f in logger.filters):
            logger.addFilter(LightningTipFilter())


def wandb_logger(save_dir: str, project: str = "ldm", name: str | None = None, **kwargs):
    """wandb, online when an API key is configured (WANDB_API_KEY or a netrc login), offline otherwise —
    the run is then synced later with `wandb sync <run>/wandb/offline-run-*`."""
    from lightning.pytorch.loggers import WandbLogger

    online = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    mode = os.environ.get("WANDB_MODE") or ("online" if online else "offline")
    return WandbLogger(save_dir=save_dir, project=project, name=name, offline=(mode == "offline"), **kwargs)


def _netrc_has_wandb() -> bool:
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, OSError, netrc.NetrcParseError):
        return False
