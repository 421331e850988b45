"""torchrun --max-restarts on torchrun's shared rendezvous store is refused before anything is built: a restarted
group would hang in init_process_group (ldm/training/run/config_checks.py; the restart itself, with the store
sharing turned off, is the slow test in tests/training/test_multinode.py)."""

import pytest

from ldm.training.run.config_checks import check_elastic_restarts
from ldm.training.run.train import ConfigError, validate
from tests.helpers.training import TINY_MODEL, compose_train

SHARED = {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}


@pytest.mark.parametrize("environ", [
    {},  # not under torchrun
    {"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"},  # no restarts: nothing to hang
    {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "False"},  # TORCH_DISABLE_SHARE_RDZV_..=1
])
def test_launches_that_restart_safely_pass(environ):
    check_elastic_restarts(environ)


def test_restarts_on_the_shared_store_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --rdzv-backend c10d"):
        check_elastic_restarts(SHARED)


def test_train_checks_the_launch_first(tmp_path, monkeypatch):
    cfg = compose_train(tmp_path, TINY_MODEL)
    validate(cfg)
    for key, value in SHARED.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="--max-restarts 1"):
        validate(cfg)
