"""Generate images from a model: ``python sample.py ckpt=<model> prompt="a red circle"``.

Configuration: configs/sample.yaml (schema ``ldm.pipelines.cli.SampleConfig``); the work is done by
``ldm.pipelines.cli.sample(cfg)``, which tests call directly.
"""

import hydra
from omegaconf import DictConfig

from ldm.pipelines.cli import register_configs, sample

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    for path in sample(cfg):
        print(path)


if __name__ == "__main__":
    main()
