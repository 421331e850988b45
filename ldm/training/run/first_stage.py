"""Two stages in one run: fit a VAE to the user's images, then train the diffusion model on its latents.

A config with a ``first_stage`` node and no ``model.autoencoder.weights`` first trains the autoencoder that node
describes on the run's own training data, in ``<run>/first_stage/`` (a run of the
autoencoder stage like ``experiment=shapes_vae``, with its own checkpoints and metrics.csv), then freezes it for the
diffusion stage: ``model.autoencoder.weights`` is set to ``<run>/first_stage/autoencoder.safetensors`` (weights,
architecture and calibrated scaling factor, Rombach et al. 2022 sec. 4.3). A resumed or repeated run in the same
folder reuses that file instead of training it again.

Whether it trains: ``first_stage.train``. ``true`` (``experiment=own_data``; a node without the key): whenever
``model.autoencoder.weights`` is not given. ``auto`` (``data=folder`` / ``hf`` / ``webdataset``, data/fit/auto.yaml):
when ``model.autoencoder.weights=auto`` picks it, i.e. when the VAE shipped for the model preset (the shapes VAE)
fails the VAE check on the training images (``choose_first_stage``, before anything is built). ``false``: never.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.training.run.auto_defaults import AUTO, from_scratch, stored_model_node
from ldm.training.run.config_checks import ConfigError

log = logging.getLogger("ldm.training")

SUBDIR = "first_stage"
WEIGHTS = "autoencoder.safetensors"
REQUIRED = ("autoencoder", "module", "loss", "optim", "max_steps", "batch_size")
SHIPPED_VAE = {"shapes": "builtin:shapes_vae"}  # the first stage ldm ships for a model preset (model=shapes)


def first_stage_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The autoencoder-stage config: the run's data, seed, trainer and loggers; the first_stage node's model,
    module, loss, optimizer, schedule, batch size and steps; its own folder ``<run>/first_stage``."""
    fs = cfg.first_stage
    missing = [k for k in REQUIRED if OmegaConf.select(fs, k) is None]
    if missing:
        raise ValueError(f"first_stage: missing {', '.join('first_stage.' + k for k in missing)}")
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        sub.stage = "autoencoder"
        sub.ckpt_path = None
        sub.task_name = f"{cfg.task_name}_{SUBDIR}"
        sub.optimized_metric = "val/rec_loss"
        sub.model = {"autoencoder": fs.autoencoder, "unet": None, "text_encoder": None, "pretrained": None}
        sub.module, sub.loss, sub.optim = fs.module, fs.loss, fs.optim
        sub.lr_scheduler = fs.get("lr_scheduler")
        sub.data.batch_size = fs.batch_size
        if "latent_cache" in sub.data:
            sub.data.latent_cache = None  # images, not latents: this stage makes the VAE
        sub.trainer.max_steps = fs.max_steps
        sub.trainer.val_check_interval = fs.max_steps
        sub.trainer.gradient_clip_val = None  # manual optimisation: AutoencoderTraining clips itself
        sub.trainer.accumulate_grad_batches = 1  # ... and steps once per batch of first_stage.batch_size
        sub.callbacks = fs.get("callbacks") or {}
        sub.paths.run_dir = str(run_dir / SUBDIR)
    return sub


def ensure_first_stage(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig], dict]) -> Path | None:
    """Train (or reuse) the first stage when ``cfg.first_stage`` asks for it; point model.autoencoder.weights at
    the result. Returns the weights path, or None when the run needs no first stage."""
    if cfg.stage != "diffusion" or OmegaConf.select(cfg, "first_stage") is None:
        return None
    if OmegaConf.select(cfg, "first_stage.train", default=True) is not True:  # false, or auto left unchosen
        return None
    if OmegaConf.select(cfg, "model.autoencoder.weights") is not None:
        log.info("first_stage: model.autoencoder.weights is set, so no VAE is trained")
        return None
    weights = run_dir / SUBDIR / WEIGHTS
    if weights.is_file():
        print(f"first stage: reusing the VAE trained earlier in this run: {weights}")
    else:
        print(f"first stage: training a VAE on the training images ({cfg.first_stage.max_steps} steps, "
              f"into {weights.parent})")
        try:
            result = train(first_stage_config(cfg, run_dir))
        except ValueError as e:  # name the key of *this* config: the stage's model.autoencoder is first_stage's
            text = str(e)
            for key in ("model.autoencoder", "module", "loss", "optim", "lr_scheduler"):
                if text.startswith(key + ":") or text.startswith(key + " "):
                    text = "first_stage." + text.removeprefix("model.")
                    break
            raise ValueError(text) from e
        weights = Path(result["autoencoder"])
        print(f"first stage: done, latent scaling factor {result['scaling_factor']:.4f}; now the diffusion model")
    with open_dict(cfg):
        cfg.model.autoencoder.weights = str(weights)
    return weights


def check_vae(cfg: DictConfig, weights: str) -> tuple[Any, Any]:
    """The VAE check (ldm.training.callbacks.vae_check: PSNR and mean colour shift of the round trip) of the model's
    autoencoder with ``weights`` on ``callbacks.vae_check.n_images`` (32) training images drawn with the seed,
    before anything else is built. Returns (report, images); (None, None) when the items carry no images."""
    from hydra.utils import instantiate

    from ldm.evaluation.reconstruction import check_autoencoder
    from ldm.training.callbacks.vae_check import sample_images

    n = int(OmegaConf.select(cfg, "callbacks.vae_check.n_images", default=None) or 32)
    images = sample_images(instantiate(cfg.data.train), n, int(cfg.seed))
    if images is None:
        return None, None
    node = copy.deepcopy(cfg.model.autoencoder)
    with open_dict(node):
        node.weights = weights
    return check_autoencoder(instantiate(node).eval(), images), images


def first_stage_minutes(cfg: DictConfig, images) -> float:
    """Rough minutes of the first stage on this machine: one timed forward + backward of its autoencoder on a batch
    of the training images, times its steps, +50% for the optimizer, loss and data loading."""
    from hydra.utils import instantiate

    fs = cfg.first_stage
    ae = instantiate(fs.autoencoder).train()
    batch = images.repeat(-(-int(fs.batch_size) // len(images)), 1, 1, 1)[:int(fs.batch_size)]
    for _ in range(2):  # the second call is timed: the first pays for allocations
        start = time.perf_counter()
        (ae.decode(ae.encode(batch).sample()) - batch).abs().mean().backward()
        seconds = time.perf_counter() - start
    return 1.5 * seconds * int(fs.max_steps) / 60


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, force_add=True)


def weights_without_data(cfg: DictConfig) -> str | None:
    """``model.autoencoder.weights=auto`` without the VAE check: the VAE file that the run stored in
    ``model.pretrained`` names (its first stage), else the VAE shipped for the preset (None: none shipped)."""
    stored = stored_model_node(cfg, "autoencoder") or {}
    if isinstance(stored.get("weights"), str) and stored["weights"] != AUTO:
        return stored["weights"]
    return SHIPPED_VAE.get(OmegaConf.select(cfg, "model.autoencoder.preset", default=None))


def _as_given(cfg: DictConfig, shipped: str | None) -> str:
    """Why no VAE check decides: a pretrained base, no VAE shipped for the preset, or first_stage.train=false."""
    if not from_scratch(cfg):
        return f"the model's own{' (' + shipped + ')' if shipped else ''} (a pretrained model or an adapter: no check)"
    if shipped is None:
        preset = OmegaConf.select(cfg, "model.autoencoder.preset", default=None)
        return f"a fresh VAE of model.autoencoder.preset={preset} (no VAE is shipped for it)"
    return f"the shipped VAE {shipped} (first_stage.train=false)"


def choose_first_stage(cfg: DictConfig, check: Callable = check_vae,
                       minutes: Callable = first_stage_minutes) -> str | None:
    """``model.autoencoder.weights=auto`` (data/fit/auto.yaml) -> the shipped VAE, or none and a first stage trained
    on the training images (``first_stage.train``: auto -> true, else the node is dropped); a first stage offered
    to ``auto`` is dropped when the weights are given. Returns the line that says what was chosen and why (None:
    nothing to choose). ``check`` / ``minutes``: the VAE check and the time estimate (tests stand in for them)."""
    weights = OmegaConf.select(cfg, "model.autoencoder.weights", default=None)
    has_node = OmegaConf.select(cfg, "first_stage") is not None
    train = OmegaConf.select(cfg, "first_stage.train", default=True) if has_node else False
    if train not in (True, False, AUTO):
        raise ConfigError(f"first_stage.train must be auto, true or false, got {train!r}")
    if weights != AUTO:
        if train == AUTO:  # offered to weights=auto only: given weights (null too: a fresh VAE) are kept as they are
            _set(cfg, "first_stage", None)
        return None
    if train is True:
        _set(cfg, "model.autoencoder.weights", None)
        return "first stage: a VAE trained on your images first (first_stage.train=true)"
    shipped = weights_without_data(cfg)
    _set(cfg, "model.autoencoder.weights", shipped)
    if not from_scratch(cfg) or shipped is None or train is False:
        if train == AUTO:
            _set(cfg, "first_stage", None)
        return "first stage: " + _as_given(cfg, shipped)
    report, images = check(cfg, shipped)
    if report is None or not report.poor:
        _set(cfg, "first_stage", None)
        if report is None:
            return f"first stage: {shipped} (the training items carry no images to check it on)"
        return f"VAE check on {report.n_images} of your images: {report.psnr_db:.1f} dB, colour shift " \
               f"{report.colour_shift:.1f}/255 -> the shipped VAE fits them ({shipped})"
    _set(cfg, "model.autoencoder.weights", None)
    _set(cfg, "first_stage.train", True)
    fs = cfg.first_stage
    return (f"VAE check on {report.n_images} of your images: {report.psnr_db:.1f} dB, colour shift "
            f"{report.colour_shift:.1f}/255 (poor: below 22 dB or above 8/255) -> training a first stage on your "
            f"images first ({_about(minutes(cfg, images))}: {fs.max_steps} steps of {fs.batch_size}, first_stage.*)")


def _about(minutes: float) -> str:
    return "under a minute" if minutes < 1 else f"~{round(minutes)} min"
