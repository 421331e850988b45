"""train(cfg): build everything from the composed Hydra config, check it, fit, and say where the results are.

A plain function (train.py at the repo root is only ``@hydra.main`` around it), so tests call it directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.data.bad_samples import bad_sample_names
from ldm.training.callbacks import BadSamplesCallback, DatasetEpochCallback
from ldm.training.config import STAGES
from ldm.training.config_checks import ConfigError, check_checkpoint_file, check_values
from ldm.training.precision import precision_overrides
from ldm.training.resume import AtomicCheckpointIO, RNGStateCallback
from ldm.training.run_folder import created_here, fold_into, refuse_links_out

log = logging.getLogger("ldm.training")


def build(node: Any, key: str, **kwargs: Any) -> Any:
    """instantiate(node) with errors that name the config key (Hydra's own messages bury the cause)."""
    if node is None:
        raise ConfigError(f"{key} is not set")
    try:
        return instantiate(node, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the key that caused it
        cause = e
        while cause.__cause__ is not None and type(cause).__name__ == "InstantiationException":
            cause = cause.__cause__
        raise ConfigError(f"{key}: {type(cause).__name__}: {cause}") from e


def validate(cfg: DictConfig) -> None:
    """Cheap checks on values, before anything is built."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    check_values(cfg)  # batch size, learning rate, val_check_interval, resolution vs the model
    steps = OmegaConf.select(cfg, "trainer.max_steps")
    if steps is not None and int(steps) == 0:
        raise ConfigError("trainer.max_steps is 0: nothing would train (use -1 for no step limit)")
    if OmegaConf.select(cfg, "adapter") and not OmegaConf.select(cfg, "model.pretrained"):
        log.warning("adapter=lora with model.pretrained=null: the adapters train on a randomly initialised base "
                    "(set model.pretrained=<checkpoint, SD file or diffusers folder>)")
    if cfg.ckpt_path not in (None, "last") and not Path(cfg.ckpt_path).exists():
        raise ConfigError(f"ckpt_path: checkpoint not found: {cfg.ckpt_path}")
    if cfg.ckpt_path not in (None, "last"):
        check_checkpoint_file(cfg.ckpt_path)


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


def check_pretrained(model: DictConfig) -> None:
    """model.pretrained: ??? (the full-size presets, experiment=sd*_finetune) must be set, to a file or folder that
    exists here or a hub id."""
    from ldm.formats.detect import looks_like_hub_id

    if OmegaConf.is_missing(model, "pretrained"):
        raise ConfigError("model.pretrained is not set: give the weights to start from, e.g. "
                          "model.pretrained=/path/to/sd_xl_base_1.0.safetensors (an SD single file, a diffusers "
                          "folder or a hub id)")
    path = model.get("pretrained")
    if path and not Path(str(path)).expanduser().exists() and not looks_like_hub_id(path):
        raise ConfigError(f"model.pretrained={path}: no such file or folder (and not a hub id 'org/name')")


def build_diffusion_module(cfg: DictConfig) -> L.LightningModule:
    from ldm.training.factories import build_bundle

    m = cfg.model
    check_pretrained(m)  # before any network (or a hub download of its tokenizers) is built
    schedule = build(cfg.schedule, "schedule")
    unet = build(m.unet, "model.unet")
    autoencoder = build(m.autoencoder, "model.autoencoder")
    text_encoder = build(m.text_encoder, "model.text_encoder")
    try:
        bundle = build_bundle(unet, autoencoder, text_encoder, schedule, pretrained=m.get("pretrained"))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    # objects are passed to the partial, not to instantiate (Hydra would turn the dataclass schedule into a config)
    make_module = build(cfg.module, "module", _partial_=True)
    adapter = build(cfg.adapter, "adapter") if OmegaConf.select(cfg, "adapter") else None
    try:
        module = make_module(
            unet=bundle.unet, autoencoder=bundle.autoencoder, text_encoder=bundle.text_encoder, schedule=schedule,
            optimizer=build(cfg.optim, "optim"),
            lr_scheduler=build(cfg.lr_scheduler, "lr_scheduler") if cfg.lr_scheduler else None, adapter=adapter)
    except ValueError as e:  # bad values found while building (adapter.init_from file, ...): name them
        raise ConfigError(str(e)) from e
    module.model_config = {"model": OmegaConf.to_container(m, resolve=True),
                           "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
                           "resolution": OmegaConf.select(cfg, "data.train.resolution", default=None)}
    return module


def build_autoencoder_module(cfg: DictConfig) -> L.LightningModule:
    return build(cfg.module, "module", _partial_=True)(
        autoencoder=build(cfg.model.autoencoder, "model.autoencoder"), loss=build(cfg.loss, "loss"),
        optimizer=build(cfg.optim, "optim"),
        lr_scheduler=build(cfg.lr_scheduler, "lr_scheduler") if cfg.lr_scheduler else None)


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured stage; returns the run folder, final metrics and written files."""
    from ldm.training.auto_defaults import resolve_auto

    if cfg.stage == "diffusion":
        try:
            resolve_auto(cfg)  # data.batch_size / trainer.max_steps / sampling cadence = auto -> numbers
        except Exception as e:  # noqa: BLE001 - the data could not be read to count it: name the key
            raise ConfigError(f"data.train: {type(e).__name__}: {e}") from e
        from ldm.training.caption_vocab import resolve_caption_vocab

        try:
            resolve_caption_vocab(cfg)  # model.text_encoder.words = captions -> the captions' words
        except ValueError as e:
            raise ConfigError(str(e)) from e
    validate(cfg)
    run_dir = Path(cfg.paths.run_dir).resolve()
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
    if ckpt_path:
        keep_metrics_history(run_dir)
    from ldm.training.first_stage import ensure_first_stage

    try:
        ensure_first_stage(cfg, run_dir, train)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    L.seed_everything(cfg.seed, workers=True)

    module = build_autoencoder_module(cfg) if cfg.stage == "autoencoder" else build_diffusion_module(cfg)
    if cfg.stage == "diffusion":  # data=dreambooth: the class folder filled with base-model samples first
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        from ldm.training.class_images import ensure_class_images

        try:
            ensure_class_images(cfg, module, rank=rank_zero_only.rank,
                                progress=bool(OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True)))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    datamodule = build(cfg.data, "data")
    bad_samples_dir = run_dir / "bad_samples"  # each unreadable sample named once per run, counted
    if hasattr(datamodule, "bad_samples_dir"):  # before anything reads the data (the latent cache build)
        datamodule.bad_samples_dir = str(bad_samples_dir)
    if cfg.stage == "diffusion" and getattr(datamodule, "latent_cache", None):
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        from ldm.training.latent_prep import encode_training_set

        try:
            encode_training_set(module, datamodule, datamodule.latent_cache, rank=rank_zero_only.rank,
                                seed=cfg.seed, progress=bool(OmegaConf.select(cfg, "trainer.enable_progress_bar",
                                                                              default=True)))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if cfg.stage == "diffusion":  # every checkpoint and export records it, whatever the data source
        from ldm.training.resolution import training_resolution

        module.model_config["resolution"] = (training_resolution(datamodule, module.autoencoder)
                                             or module.model_config.get("resolution"))
        from ldm.training.resolution import training_buckets

        buckets = training_buckets(datamodule)
        if buckets is not None:  # aspect-ratio buckets: their table and max area too
            module.model_config["buckets"] = buckets
    callbacks = [build(c, f"callbacks.{k}") for k, c in (cfg.callbacks or {}).items() if _is_callback_node(c, k)]
    callbacks.append(RNGStateCallback())  # always: exact resume needs the generators' states
    callbacks.append(DatasetEpochCallback())  # always: iterable datasets reshuffle per epoch
    if hasattr(datamodule, "bad_samples_dir"):
        callbacks.append(BadSamplesCallback(bad_samples_dir))
    loggers = [build(c, f"logger.{k}") for k, c in (cfg.logger or {}).items() if c is not None]
    precision = precision_overrides(cfg)  # 16-mixed on the CPU: fp16 autocast + GradScaler("cpu"), not bf16
    plugins = [AtomicCheckpointIO(), *precision.pop("plugins", [])]
    trainer: L.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
                               default_root_dir=str(run_dir), plugins=plugins, **precision)
    for cb in trainer.checkpoint_callbacks:  # partial files of a save that was killed (or ran out of disk)
        for stale in AtomicCheckpointIO.remove_stale(cb.dirpath) if getattr(cb, "dirpath", None) else []:
            log.warning("removed %s, left by an interrupted checkpoint save", stale)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=False)

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "global_step": trainer.global_step,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and getattr(ckpt_cb, "last_model_path", ""):
        result["last_checkpoint"] = ckpt_cb.last_model_path
    if cfg.stage == "autoencoder" and trainer.is_global_zero:
        from ldm.formats.autoencoder_file import save_autoencoder
        from ldm.training.factories import calibrate_scaling_factor

        result["scaling_factor"] = calibrate_scaling_factor(module.autoencoder, datamodule.train_dataloader())
        result["autoencoder"] = str(save_autoencoder(module.autoencoder, run_dir / "autoencoder.safetensors"))
    for cb in callbacks:
        if getattr(cb, "last_path", None):
            result["sample_grid"] = str(cb.last_path)
        if getattr(cb, "results", None):
            result["prompt_accuracy"] = cb.results
        if getattr(cb, "report", None) is not None:
            result["vae_check"] = cb.report.as_dict()
        if getattr(cb, "images_per_sec", None):
            result["images_per_sec"] = cb.images_per_sec
    bad = bad_sample_names(bad_samples_dir)
    if bad:
        result["bad_samples"] = bad
    if trainer.is_global_zero:
        print_summary(result, run_dir, bad_samples_dir)
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
    if result.get("bad_samples"):
        print(f"  unreadable samples skipped: {len(result['bad_samples'])} (each named once in the log; listed in "
              f"{bad_samples_dir})")
