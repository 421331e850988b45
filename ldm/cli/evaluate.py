"""``evaluate(cfg) -> dict``: the body of ``python -m ldm.evaluate``, callable without a command line.

Loads the model like sample.py (any checkpoint / export ``ldm.formats.load.load_bundle`` reads), takes the first ``n``
validation items of the data, computes the validation loss on them and generates an image per caption for the
image metrics, prints a table and writes it as JSON.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.cli.evaluate_config import CONFIGS, EVAL_METRICS, EvaluateConfig, EvaluateConfigError
from ldm.cli.run_config import local_paths, read_run_config, resolved_data, run_config_path, without_cache
from ldm.evaluation.eval_set import first_items, prompt_checker
from ldm.evaluation.metrics import build_image_metrics, group_by_reason, score_share
from ldm.formats.safe_paths import writable_inside
from ldm.pipelines.sampling_options import SamplingOptions

log = logging.getLogger("ldm.evaluation")


def typed_config(cfg: Any) -> DictConfig:
    """cfg merged onto the schema: unknown keys and wrong types are errors."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    try:
        return OmegaConf.merge(OmegaConf.structured(EvaluateConfig), cfg)
    except Exception as err:  # omegaconf's ConfigKeyError / ValidationError
        raise EvaluateConfigError(f"bad evaluate config: {err}") from err


def run_folder(ckpt: str) -> Path | None:
    """The training run a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``), the folder holding
    any other file, an export / diffusers folder itself; None for a hub id."""
    path = Path(ckpt)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return None


# Data classes that moved since earlier runs wrote their config.yaml: old import path -> where it lives now.
MOVED_TARGETS = {"ldm.data.shapes.ShapesDataset": "ldm.tasks.shapes.dataset.ShapesDataset"}


def renamed_targets(node: Any, source: Path) -> Any:
    """``node`` (plain containers) with every ``_target_`` of MOVED_TARGETS replaced by its new path."""
    if isinstance(node, dict):
        out = {k: renamed_targets(v, source) for k, v in node.items()}
        if out.get("_target_") in MOVED_TARGETS:
            log.info("%s: %s has moved to %s", source, out["_target_"], MOVED_TARGETS[out["_target_"]])
            out["_target_"] = MOVED_TARGETS[out["_target_"]]
        return out
    if isinstance(node, list):
        return [renamed_targets(v, source) for v in node]
    return node


def allowed_data_targets() -> set[str]:
    """Every ``_target_`` our own ``configs/data/*.yaml`` name: the only classes a run's config.yaml may build."""
    targets: set[str] = set()

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                targets.add(node["_target_"])
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    for path in sorted((CONFIGS / "data").glob("*.yaml")):
        collect(OmegaConf.to_container(OmegaConf.load(path)))
    return targets


def check_targets(node: Any, source: Path, allowed: set[str], key: str = "data") -> None:
    """A run folder may come from elsewhere: its config.yaml is data, so it may only name the data classes of our
    own configs (nothing it names is imported otherwise)."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and target not in allowed:
            raise EvaluateConfigError(f"{source}: {key}._target_ = {target!r} is not one of ldm's data classes "
                                      f"({sorted(allowed)}); refusing to build it. Set data=<a configs/data/ option>")
        for k, v in node.items():
            check_targets(v, source, allowed, f"{key}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_targets(v, source, allowed, f"{key}[{i}]")


def data_config(cfg: DictConfig) -> DictConfig:
    """``data`` as given, else the data of the checkpoint's training run (``<run>/config.yaml`` beside
    ``<run>/checkpoints/``), read as bounded data (ldm.cli.run_config: node interpolations only, local paths that
    exist, each named in a log line); the import paths of MOVED_TARGETS brought up to date, so runs made before a
    class moved still evaluate."""
    if cfg.data is not None:
        return cfg.data
    saved = run_config_path(cfg.ckpt)
    if saved is None:
        raise EvaluateConfigError(f"no data given and {cfg.ckpt} is not a checkpoint of a training run "
                                  "(<run>/checkpoints/<name>.ckpt beside <run>/config.yaml) to take it from: set "
                                  "data=<a configs/data/ option, e.g. shapes> (with data.<key>=... as needed)")
    raw = without_cache(read_run_config(saved))
    if raw.get("data") is None:
        raise EvaluateConfigError(f"{saved} has no data section: set data=<a configs/data/ option>")
    data = renamed_targets(resolved_data(raw, saved), saved)
    check_targets(data, saved, allowed_data_targets())
    paths = local_paths(data, saved)
    log.info("%s: evaluating on the run's data, read from %s", saved, "; ".join(paths) or "no files (generated)")
    return OmegaConf.create(data)


def check_options(cfg: DictConfig) -> None:
    from ldm.formats.detect import detect_source

    if OmegaConf.is_missing(cfg, "ckpt") or not str(cfg.ckpt).strip():
        raise EvaluateConfigError("no model given: python -m ldm.evaluate <checkpoint or export folder> (or ckpt=...)")
    detect_source(cfg.ckpt)
    unknown = [m for m in cfg.metrics if m not in EVAL_METRICS]
    if unknown or not cfg.metrics:
        raise EvaluateConfigError(f"metrics: unknown or empty {list(unknown or cfg.metrics)}; choose from "
                                  f"{list(EVAL_METRICS)}")
    for key in ("n", "kid_subset_size"):
        if cfg[key] < 1:
            raise EvaluateConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise EvaluateConfigError(f"batch_size must be >= 1 (or null), got {cfg.batch_size}")
    if not math.isfinite(cfg.guidance_scale):
        raise EvaluateConfigError(f"guidance_scale must be a finite number, got {cfg.guidance_scale}")
    try:
        SamplingOptions.of(cfg.sampler)
    except ValueError as err:
        raise EvaluateConfigError(str(err)) from err


def validation_data(data_cfg: DictConfig):
    """(validation dataset, its batch size) of a data config."""
    dm = instantiate(data_cfg)
    dm.setup("validate")
    if dm.val_dataset is None:
        raise EvaluateConfigError("the data has no validation split: set data.val=... or data.val_fraction=...")
    return dm.val_dataset, getattr(dm, "val_batch_size", None) or 16


def evaluate(cfg: Any) -> dict[str, Any]:
    """Compute the configured metrics; returns {"metrics", "skipped", "settings", "path", ...} and writes JSON."""
    import torch

    from ldm.training.module.val_loss import validation_loss
    from ldm.formats.load import load_bundle
    from ldm.pipelines import text_to_image

    cfg = typed_config(cfg)
    check_options(cfg)
    output_path(cfg)  # a link shipped in the model's folder is refused before the work, and again when writing
    val, val_batch_size = validation_data(data_config(cfg))
    items = first_items(val, cfg.n)
    if not len(items):
        raise EvaluateConfigError("the validation split is empty")
    batch_size = cfg.batch_size or val_batch_size
    bundle = load_bundle(cfg.ckpt, use_ema=cfg.use_ema, device=cfg.device, dtype=cfg.dtype)
    device = next(bundle.unet.parameters()).device

    values: dict[str, float] = {}
    if "val_loss" in cfg.metrics:
        values["val_loss"] = validation_loss(bundle, items, batch_size)
    image_names = [m for m in cfg.metrics if m != "val_loss"]
    image_metrics = build_image_metrics(
        image_names, inception_weights=cfg.inception_weights, clip_model=cfg.clip_model, n_images=len(items),
        kid_subset_size=cfg.kid_subset_size, checker=prompt_checker(val), kid_seed=cfg.seed,
        real_images=items.has_images)
    for names, reason in image_metrics.skipped_groups():
        log.warning("%s skipped: %s", " and ".join(names), reason)
    if image_metrics:
        height, width = items.resolution or (None, None)
        sampler = SamplingOptions.of(cfg.sampler)

        def sample(prompts: list[str], seed: int) -> torch.Tensor:
            return text_to_image(bundle, prompts, sampler=sampler, guidance_scale=cfg.guidance_scale, seed=seed,
                                 height=height, width=width)

        values.update(score_share(image_metrics.to(device), items, sample, batch_size=batch_size, seed=cfg.seed))

    result: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt), "global_step": bundle.meta.get("global_step"), "n": len(items),
        "metrics": values, "skipped": image_metrics.skipped,
        "settings": {"sampler": OmegaConf.to_container(cfg.sampler), "guidance_scale": cfg.guidance_scale,
                     "seed": cfg.seed, "batch_size": batch_size, "use_ema": cfg.use_ema, "dtype": cfg.dtype},
    }
    result["path"] = str(write_json(result, output_path(cfg)))
    return result


def output_path(cfg: DictConfig) -> Path:
    """<out_dir or the checkpoint's run folder/eval>/<checkpoint name>.json. In the model's own folder (which may
    come from elsewhere) never through a symbolic link shipped there: ``eval -> ~/somewhere`` is refused."""
    run = run_folder(cfg.ckpt)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else (run / "eval" if run is not None else Path("eval"))
    name = Path(str(cfg.ckpt).rstrip("/")).stem or "model"
    path = out_dir / f"{name.replace('/', '_')}.json"
    if cfg.out_dir or run is None:
        return path
    try:
        return writable_inside(path, run)
    except OSError as err:
        raise EvaluateConfigError(f"{err}; or set out_dir=<folder> to write the results elsewhere") from None


def shared_result(result: dict[str, Any]) -> dict[str, Any]:
    """The result as written to JSON, a file people share: the checkpoint named relative to its run folder (else a
    hub id / relative path as given, or its file name), the paths in skipped metrics' reasons reduced to file names
    (``ldm.formats.shared_names``). The returned result and the printed table keep the full paths for the user."""
    from ldm.formats.shared_names import shared_config, shared_name

    shared = {k: shared_config(v) for k, v in result.items() if k != "path"}
    shared["checkpoint"] = shared_name(result["checkpoint"], run_folder(result["checkpoint"]))
    return shared


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(shared_result(result), indent=2) + "\n")
    return path


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a two-column text table; skipped metrics show why."""
    s = result["settings"]
    lines = [f"{result['checkpoint']}: {result['n']} validation prompts, {s['sampler']['name']} "
             f"{s['sampler']['steps']} steps, guidance {s['guidance_scale']}, seed {s['seed']}",
             f"  {'metric':<18} value"]
    values = result["metrics"]
    for name, value in values.items():
        if name == "kid_std":
            continue
        text = f"{value:.6g}" + (f" ± {values['kid_std']:.3g}" if name == "kid" and "kid_std" in values else "")
        lines.append(f"  {name:<18} {text}")
    for names, reason in group_by_reason(result["skipped"]):
        lines.append(f"  {', '.join(names):<18} skipped: {reason}")
    return "\n".join(lines)
