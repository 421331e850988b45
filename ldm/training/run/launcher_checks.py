"""Checks on how the run was launched (torchrun's environment), made before anything is built.

torchrun (torch >= 2.5) shares its c10d rendezvous store with the ranks by default: every round of the rendezvous
hands the ranks the same store, which still holds the previous round's process-group keys (gloo's rank addresses,
NCCL's unique id). A group restarted by ``--max-restarts`` then reads its dead predecessors' addresses and hangs in
``init_process_group`` (seen here: 2 gloo ranks still waiting 3 minutes after a 60 s timeout; pytorch/pytorch#135712
reports the NCCL side). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment gives every round a fresh
store on rank 0, and the restart works (tests/training/test_multinode.py).
"""

from __future__ import annotations

import os
from typing import Mapping

from ldm.training.run.config_checks import ConfigError


def check_elastic_restarts(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a torchrun launch that may restart its ranks (--max-restarts > 0) on the shared rendezvous store."""
    try:
        restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return  # not torchrun's value: nothing of ours to check
    if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError(
            f"torchrun --max-restarts {restarts}: the restarted ranks would hang in init_process_group, because "
            "torchrun shares its rendezvous store with them and that store keeps the killed group's addresses "
            "(pytorch/pytorch#135712); start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment "
            "(e.g. `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts 3 ... train.py ckpt_path=auto`), "
            "or without --max-restarts")
