"""train(cfg): build everything from the composed Hydra config, check it, fit, and say where the results are.

A plain function (train.py at the repo root is only ``@hydra.main`` around it), so tests call it directly.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.data.bad_samples import bad_sample_names
from ldm.training.callbacks.data import BadSamplesCallback, DatasetEpochCallback
from ldm.training.callbacks.preemption import DEFAULT_SIGNALS, PreemptionCallback, SignalExit, signal_numbers
from ldm.training.callbacks.preemption import resume_command, stop_summary
from ldm.training.callbacks.progress import default_progress_bar
from ldm.training.callbacks.result import ResultCallback
from ldm.training.run.config import STAGES
from ldm.training.run.config_checks import ConfigError, check_checkpoint_file, check_elastic_restarts, check_values
from ldm.training.run.first_stage import ensure_first_stage
from ldm.training.build.loggers import quiet_lightning_tips
from ldm.training.build.precision import precision_overrides
from ldm.training.run.resume import AtomicCheckpointIO, RNGStateCallback
from ldm.training.run.run_folder import created_here, fold_into, refuse_links_out
from ldm.training.run.stages import STAGE_KINDS, build, build_autoencoder_module, build_diffusion_module

__all__ = ["ConfigError", "build", "build_autoencoder_module", "build_diffusion_module", "train"]

log = logging.getLogger("ldm.training")


def validate(cfg: DictConfig) -> None:
    """Cheap checks on values, before anything is built."""
    check_elastic_restarts()  # torchrun --max-restarts on its shared store: a restart would hang
    check_values(cfg)  # batch size, learning rate, val_check_interval, resolution vs the model
    steps = OmegaConf.select(cfg, "trainer.max_steps")
    if steps is not None and int(steps) == 0:
        raise ConfigError("trainer.max_steps is 0: nothing would train (use -1 for no step limit)")
    if OmegaConf.select(cfg, "adapter") and not OmegaConf.select(cfg, "model.pretrained"):
        log.warning("adapter=lora with model.pretrained=null: the adapters train on a randomly initialised base "
                    "(set model.pretrained=<checkpoint, SD file or diffusers folder>)")
    if cfg.ckpt_path not in (None, "last", "auto") and not Path(cfg.ckpt_path).exists():
        raise ConfigError(f"ckpt_path: checkpoint not found: {cfg.ckpt_path}")
    if cfg.ckpt_path not in (None, "last", "auto"):
        check_checkpoint_file(cfg.ckpt_path)
    try:
        signal_numbers(_signals(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _signals(cfg: DictConfig) -> list[str]:
    """The signals that stop a run with a checkpoint (``signals=[]``: none, Lightning's own handling)."""
    return list(OmegaConf.select(cfg, "signals", default=list(DEFAULT_SIGNALS)) or [])


def _is_callback_node(node: Any, key: str) -> bool:
    """A callbacks.<key> entry to build. An entry with settings but no _target_ is what is left when an experiment
    tunes a callback (e.g. experiment=own_data's callbacks.sampling.every_n_steps) that callbacks=none removed."""
    if node is None:
        return False
    if OmegaConf.is_dict(node) and "_target_" not in node:
        log.warning("callbacks.%s has settings but no _target_ (its callback is not in the callbacks group): "
                    "not built", key)
        return False
    return True


def find_last_run(cfg: DictConfig, run_dir: Path) -> Path:
    """ckpt_path=last: the run folder to continue: paths.run_dir if it has a last.ckpt, else the newest run of
    this task under paths.output_dir that has one."""
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        return run_dir
    root = Path(cfg.paths.output_dir) / cfg.task_name
    candidates = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"ckpt_path=last: no run with checkpoints/last.ckpt in {run_dir} or under {root} "
                          "(set paths.run_dir=<run folder> to pick one)")
    return candidates[-1].parent.parent


def keep_metrics_history(run_dir: Path) -> None:
    """Lightning's CSV logger starts metrics.csv afresh on resume; keep the earlier rows beside it."""
    metrics = run_dir / "metrics.csv"
    if metrics.exists():
        n = len(list(run_dir.glob("metrics.before-resume-*.csv")))
        metrics.rename(run_dir / f"metrics.before-resume-{n + 1}.csv")


def train(cfg: DictConfig, within: Path | None = None) -> dict[str, Any]:
    """Fit the configured stage; returns the run folder, final metrics and written files (``within``: the run folder
    of the run this one is the first stage of). The steps, in order:"""
    validate_stage(cfg)
    stage = STAGE_KINDS[cfg.stage]
    stage.resolve_config(cfg)  # the "auto" values -> numbers, before anything checks them
    validate(cfg)
    run_dir, ckpt_path = prepare_run_folder(cfg)
    try:
        ensure_first_stage(cfg, run_dir, partial(train, within=run_dir))  # a VAE to train first (own_data)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    L.seed_everything(cfg.seed, workers=True)
    module = stage.build_module(cfg)
    module.run_dir = run_dir  # where the run's own files go (an adapter file, embeddings)
    stage.before_data(cfg, module)
    datamodule = build(cfg.data, "data")
    bad_samples_dir = run_dir / "bad_samples"  # each unreadable sample named once per run, counted
    if hasattr(datamodule, "bad_samples_dir"):  # before anything reads the data (the latent cache build)
        datamodule.bad_samples_dir = str(bad_samples_dir)
    stage.before_fit(cfg, module, datamodule)
    callbacks = build_callbacks(cfg, datamodule, bad_samples_dir)
    trainer = build_trainer(cfg, run_dir, callbacks)
    if trainer.is_global_zero:  # one writer on a file system all nodes share
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=False)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SignalExit as stop:  # preempted: say what was saved and how to resume, then exit 128 + signal
        stop.result = fit_result(trainer, callbacks, run_dir)
        stop.result["stopped"].update(resume=resume_command(within or run_dir), first_stage=within is not None)
        if trainer.is_global_zero:
            print_summary(stop.result, run_dir, bad_samples_dir)
        raise

    result = fit_result(trainer, callbacks, run_dir)
    if trainer.is_global_zero:
        result.update(stage.results(module, datamodule, run_dir))
    bad = bad_sample_names(bad_samples_dir)
    if bad:
        result["bad_samples"] = bad
    if trainer.is_global_zero:
        print_summary(result, run_dir, bad_samples_dir)
    return result


def validate_stage(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {cfg.stage!r}")


def prepare_run_folder(cfg: DictConfig) -> tuple[Path, str | None]:
    """The run folder (an earlier run's, for ckpt_path=last) and the checkpoint to resume from, if any."""
    run_dir = Path(cfg.paths.run_dir).resolve()
    if cfg.ckpt_path == "auto":  # one command for the first start and every restart (torchrun --max-restarts)
        OmegaConf.update(cfg, "ckpt_path", "last" if (run_dir / "checkpoints" / "last.ckpt").exists() else None)
    if cfg.ckpt_path == "last":  # continue in the same run folder
        run_dir = find_last_run(cfg, run_dir)
        refuse_links_out(run_dir)  # before anything is written there (a run folder may come from elsewhere)
        OmegaConf.update(cfg, "paths.run_dir", str(run_dir))
        print(f"resuming {run_dir / 'checkpoints' / 'last.ckpt'}")
        for fresh in created_here():  # Hydra's fresh folder for this process: its files go into the run's
            fold_into(fresh, run_dir)
    else:  # paths.run_dir may name a folder that exists, from elsewhere too
        refuse_links_out(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = str(run_dir / "checkpoints" / "last.ckpt") if cfg.ckpt_path == "last" else cfg.ckpt_path
    if cfg.ckpt_path == "last":
        check_checkpoint_file(ckpt_path)
    if ckpt_path and rank_zero_only.rank == 0:  # the other ranks (other nodes) must not rename it as well
        keep_metrics_history(run_dir)
    return run_dir, ckpt_path


def build_callbacks(cfg: DictConfig, datamodule: Any, bad_samples_dir: Path) -> list[L.Callback]:
    """The configured callbacks, and those every run has."""
    callbacks = [build(c, f"callbacks.{k}") for k, c in (cfg.callbacks or {}).items() if _is_callback_node(c, k)]
    callbacks.append(RNGStateCallback())  # always: exact resume needs the generators' states
    callbacks.append(DatasetEpochCallback())  # always: iterable datasets reshuffle per epoch
    callbacks += default_progress_bar(OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True), callbacks)
    if hasattr(datamodule, "bad_samples_dir"):
        callbacks.append(BadSamplesCallback(bad_samples_dir))
    if _signals(cfg):  # last: it saves where ModelCheckpoint does, after every other callback's batch end
        callbacks.append(PreemptionCallback(Path(cfg.paths.run_dir).resolve() / "checkpoints", _signals(cfg)))
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    """The Lightning Trainer with the loggers, precision and atomic checkpoint writes; partial files of a killed
    save are removed first."""
    quiet_lightning_tips()  # Lightning's product advertisements, logged while the Trainer is made and at fit
    loggers = [build(c, f"logger.{k}") for k, c in (cfg.logger or {}).items() if c is not None]
    precision = precision_overrides(cfg)  # 16-mixed on the CPU: fp16 autocast + GradScaler("cpu"), not bf16
    plugins = [AtomicCheckpointIO(), *precision.pop("plugins", [])]
    trainer: L.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
                               default_root_dir=str(run_dir), plugins=plugins, **precision)
    for cb in trainer.checkpoint_callbacks:  # partial files of a save that was killed (or ran out of disk)
        for stale in AtomicCheckpointIO.remove_stale(cb.dirpath) if getattr(cb, "dirpath", None) else []:
            log.warning("removed %s, left by an interrupted checkpoint save", stale)
    return trainer


def fit_result(trainer: L.Trainer, callbacks: list[L.Callback], run_dir: Path) -> dict[str, Any]:
    """The run folder, steps, final metrics, last checkpoint, and what each reporting callback found."""
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "global_step": trainer.global_step,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and getattr(ckpt_cb, "last_model_path", ""):
        result["last_checkpoint"] = ckpt_cb.last_model_path
    for cb in callbacks:
        if isinstance(cb, ResultCallback):
            result.update(cb.result())
    return result


def print_summary(result: dict[str, Any], run_dir: Path, bad_samples_dir: Path | None = None) -> None:
    """The end of a run: where its files are, how well the frozen VAE fit the data, how fast it trained."""
    print(f"\nrun folder: {run_dir}  ({result['global_step']} steps)")
    for key in ("last_checkpoint", "autoencoder", "sample_grid"):
        if key in result:
            print(f"  {key.replace('_', ' ')}: {result[key]}")
    if (run_dir / "samples").is_dir():
        print(f"  sample grids: {run_dir / 'samples'} ({len(list((run_dir / 'samples').glob('*.png')))} PNGs)")
    if "vae_check" in result:
        v = result["vae_check"]
        verdict = "POOR: see the warning at the start" if v["poor"] else "ok"
        print(f"  vae check: PSNR {v['psnr_db']:.1f} dB, mean colour shift {v['colour_shift']:.1f}/255 ({verdict})")
    if "images_per_sec" in result:
        print(f"  throughput: {result['images_per_sec']:.1f} training images/s (all ranks, pauses included)")
    if "stopped" in result:
        print("\n".join(stop_summary(result["stopped"], run_dir)))
    if result.get("bad_samples"):
        print(f"  unreadable samples skipped: {len(result['bad_samples'])} (each named once in the log; listed in "
              f"{bad_samples_dir})")
