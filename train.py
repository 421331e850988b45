"""python train.py [overrides...]: the Hydra entry point around ldm.training.run.train.train(cfg)."""

import hydra
from omegaconf import DictConfig

from ldm.training.run.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from ldm.training.run.train import ConfigError, train

    try:
        result = train(cfg)
    except ConfigError as err:  # found before training: the message names the key to fix, no traceback needed
        raise SystemExit(f"ldm: the config needs a fix before training starts:\n{err}") from None
    metric = cfg.get("optimized_metric")
    return result["metrics"].get(metric) if metric else None  # what a sweeper (Optuna) optimises


if __name__ == "__main__":
    main()
