"""Logger factories that need a decision at run time."""

from __future__ import annotations

import os


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
