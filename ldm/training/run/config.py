"""Structured-config schema of train.yaml's top level: typed scalars, required groups marked ???.

Hydra validates the composed config against it, so a misspelt top-level key or a wrong type stops the run
before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ldm.pipelines.sampling_options import SamplingOptions
from ldm.training.callbacks.preemption import DEFAULT_SIGNALS
from ldm.training.run.class_images import ClassImagesConfig


@dataclass
class TrainConfig:
    task_name: str = "train"
    stage: str = "diffusion"  # "diffusion" (U-Net on frozen VAE + text encoder) or "autoencoder" (first stage)
    seed: int = 0
    ckpt_path: Optional[str] = None  # a checkpoint path, "last" (<run>/checkpoints/last.ckpt), or "auto" (last if
    # paths.run_dir has a last.ckpt, else a fresh start: one command for torchrun --max-restarts / requeues)
    optimized_metric: Optional[str] = "val/loss"  # returned to sweepers (hparams_search)
    model: Any = MISSING
    data: Any = MISSING
    schedule: Any = None
    sampler: SamplingOptions = field(default_factory=SamplingOptions)  # the training callbacks' (configs/sampler/)
    module: Any = MISSING
    adapter: Any = None  # configs/adapter/: LoRA on a frozen base (null: train the whole U-Net)
    optim: Any = MISSING
    lr_scheduler: Any = None
    loss: Any = None  # autoencoder stage only
    first_stage: Any = None  # a VAE to fit to the data before the diffusion stage (ldm.training.run.first_stage)
    class_images: ClassImagesConfig = field(default_factory=ClassImagesConfig)  # data=dreambooth's missing ones
    trainer: Any = MISSING
    callbacks: Any = field(default_factory=dict)
    logger: Any = field(default_factory=dict)
    paths: Any = MISSING
    # signals that stop a run with a checkpoint at the step reached and exit status 128 + signal (SLURM sends SIGUSR1
    # with --signal=USR1@90); [] leaves them to Lightning (SIGTERM: exit 0, no checkpoint)
    signals: list[str] = field(default_factory=lambda: list(DEFAULT_SIGNALS))


STAGES = ("diffusion", "autoencoder")


def register_configs() -> None:
    from ldm.training.run.run_folder import register_resolver

    register_resolver()  # ${ldm_unique_dir:...} of configs/hydra/default.yaml
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
