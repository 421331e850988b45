"""The schema of configs/evaluate.yaml (``evaluate_schema`` in Hydra's ConfigStore; unknown keys are errors) and
composing it from ``key=value`` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig

from ldm.evaluation.metrics import METRIC_NAMES
from ldm.pipelines.sampling_options import SamplingOptions

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EVAL_METRICS = ("val_loss", *METRIC_NAMES)


class EvaluateConfigError(ValueError):
    """An evaluation option is wrong; the message names it."""


@dataclass
class EvaluateConfig:
    ckpt: str = MISSING  # training .ckpt, export folder, SD single file or diffusers folder
    data: Any = None  # a configs/data/ option (data=shapes); null = the data of the checkpoint's run (config.yaml)
    n: int = 64  # the first n validation items: their captions are the prompts, their images the real set
    metrics: list = field(default_factory=lambda: list(EVAL_METRICS))
    inception_weights: Optional[str] = None  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    clip_model: Optional[str] = None  # a CLIP model folder in transformers' layout
    sampler: SamplingOptions = field(default_factory=SamplingOptions)  # configs/sampler/, passed whole
    guidance_scale: float = 4.0
    seed: int = 0  # batch starting at item i is sampled with seed + i (and ${seed} of the data configs)
    batch_size: Optional[int] = None  # images per model call and val-loss batch; null = the data's val batch size
    use_ema: bool = True
    device: str = "auto"
    dtype: str = "float32"
    kid_subset_size: int = 100
    out_dir: Optional[str] = None  # null: <the checkpoint's run folder>/eval
    paths: Any = None


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def compose_evaluate(overrides: list[str], config_dir: str | Path = CONFIGS) -> DictConfig:
    """configs/evaluate.yaml with Hydra ``key=value`` overrides (the command line of ``python -m ldm.evaluate``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not Path(config_dir).is_dir():
        raise FileNotFoundError(f"{config_dir} not found: `python -m ldm.evaluate` reads the repository's configs/ "
                                "(run it from a source checkout installed with `pip install -e .`)")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))
