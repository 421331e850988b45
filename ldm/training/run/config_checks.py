"""Checks on config values that would otherwise fail deep inside ``trainer.fit`` without naming the key.

Everything here reads the composed config (and at most a checkpoint's or weights file's header, or the
launcher's environment): nothing is built, nothing is downloaded. Each error names the key (or variable) to fix.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.formats.safe_load import CheckpointError


class ConfigError(ValueError):
    """A configuration problem found before training starts; the message names the key to fix."""


def _number(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def check_positive_int(cfg: DictConfig, key: str) -> None:
    value = _number(cfg, key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def check_positive_float(cfg: DictConfig, key: str) -> None:
    value = _number(cfg, key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a positive number (e.g. 1e-4), got {value!r}")


def check_val_check_interval(cfg: DictConfig) -> None:
    """Lightning's val_check_interval: an int = every N training steps, a float in (0, 1] = that fraction of
    an epoch, or null."""
    key = "trainer.val_check_interval"
    value = _number(cfg, key)
    if value is None:
        return
    ok = not isinstance(value, bool) and (
        (isinstance(value, numbers.Integral) and value >= 1)
        or (isinstance(value, numbers.Real) and 0.0 < value <= 1.0))
    if not ok:
        raise ConfigError(f"{key} must be a positive integer (validate every N steps), a fraction of an epoch "
                          f"in (0, 1], or null; got {value!r}")


# ---- the pixel size a model can take: the autoencoder's and the U-Net's downsampling together

def _factor(channel_mult: Any) -> int:
    return 2 ** (len(channel_mult) - 1)


def _default(fn: Any, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


def unet_downsampling(node: dict) -> int | None:
    """2^(levels - 1) of a ``model.unet`` node, or None for a network this check does not know."""
    from ldm.models.unet import UNET_PRESETS, UNetConfig

    target = node.get("_target_", "")
    if target == "ldm.models.unet.UNet.from_preset":
        preset = UNET_PRESETS.get(node.get("name"))
        if preset is None:
            return None
        return _factor(node.get("channel_mult", preset.get("channel_mult", UNetConfig.channel_mult)))
    if target == "ldm.models.unet.UNet":
        return _factor(node.get("channel_mult", UNetConfig.channel_mult))
    return None


def autoencoder_downsampling(node: dict) -> int | None:
    """The first stage's downsampling of a ``model.autoencoder`` node (1 in pixel space), or None if unknown.
    A weights file decides by the config in its header (read, not loaded), as the builder does."""
    from ldm.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig
    from ldm.formats.assets import resolve_weights
    from ldm.formats.safe_build import stored_autoencoder_config
    from ldm.training.build.factories import autoencoder

    if node.get("_target_") != "ldm.training.build.factories.autoencoder":
        return None
    if node.get("pixel_space", _default(autoencoder, "pixel_space")):
        return 1
    if "channel_mult" in node:
        return _factor(node["channel_mult"])
    weights = node.get("weights")
    if weights:
        try:
            stored = stored_autoencoder_config(resolve_weights(weights)) or {}
        except Exception:  # noqa: BLE001 - a missing/bad file is reported by the builder, naming it
            return None
        if "channel_mult" in stored:
            return _factor(stored["channel_mult"])
    preset = AUTOENCODER_PRESETS.get(node.get("preset", _default(autoencoder, "preset")))
    if preset is None:
        return None
    return _factor(preset.get("channel_mult", AutoencoderConfig.channel_mult))


def check_resolution(cfg: DictConfig) -> None:
    """data.{train,val}.resolution must be a multiple of what the model downsamples by (its VAE x its U-Net):
    otherwise the U-Net fails on the first batch (40 with the default model) or the VAE silently crops (33)."""
    model = OmegaConf.select(cfg, "model")
    if model is None or cfg.get("stage") != "diffusion":
        return
    model = OmegaConf.to_container(model, resolve=False)
    unet = unet_downsampling(model.get("unet") or {})
    ae = autoencoder_downsampling(model.get("autoencoder") or {})
    if unet is None or ae is None:
        return
    multiple = unet * ae
    for split in ("train", "val"):
        key = f"data.{split}.resolution"
        value = _number(cfg, key)
        if value is None:
            continue
        sizes = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0 or size % multiple:
                lower = max(multiple, int(size) // multiple * multiple) if isinstance(size, numbers.Real) else multiple
                raise ConfigError(
                    f"{key}={value!r}: the model downsamples by {multiple} (autoencoder x{ae}, U-Net x{unet}), "
                    f"so the resolution must be a positive multiple of {multiple} (e.g. {lower} or "
                    f"{lower + multiple})")
        buckets = OmegaConf.select(cfg, f"data.{split}.buckets")
        if buckets is not None and buckets.get("enabled"):  # every bucket side is a multiple of the step
            step = buckets.get("step")
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step <= 0 or step % multiple:
                raise ConfigError(
                    f"data.{split}.buckets.step={step!r}: the model downsamples by {multiple} (autoencoder x{ae}, "
                    f"U-Net x{unet}), so every bucket side, a multiple of the step, needs a step that is a positive "
                    f"multiple of {multiple}")


def check_checkpoint_file(path: str | Path) -> None:
    """A training checkpoint is a zip archive (torch.save): a truncated or foreign file is caught from its
    central directory, which is read without loading anything."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        raise CheckpointError(f"ckpt_path: {path} is not a readable checkpoint (truncated or not a torch.save "
                              f"file, {path.stat().st_size} bytes); pick another one, e.g. an earlier "
                              f"step*.ckpt in {path.parent}")


# ---- module.loss / module.timesteps / module.noise / module.compile_backend of the diffusion stage

def _options(cfg: DictConfig, key: str, cls: type) -> Any:
    """The dataclass a module.<key> node builds, made here to check its values (plain numbers, nothing heavy)."""
    node = OmegaConf.select(cfg, key)
    if node is None:
        return cls()
    fields = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    known = set(inspect.signature(cls).parameters)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; the keys are {sorted(known)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e) if key in str(e) else f"{key}: {e}") from e


def check_diffusion_options(cfg: DictConfig) -> None:
    """Loss type, Huber schedule, timestep sampling, noise options and compile backend, before anything trains."""
    from ldm.diffusion.losses import LossOptions
    from ldm.diffusion.noise import NoiseOptions
    from ldm.diffusion.timestep_sampling import TimestepSampling
    from ldm.training.module.unet_compile import check_backend

    if cfg.get("stage") != "diffusion" or OmegaConf.select(cfg, "module") is None:
        return
    loss = _options(cfg, "module.loss", LossOptions)
    timesteps = _options(cfg, "module.timesteps", TimestepSampling)
    noise = _options(cfg, "module.noise", NoiseOptions)
    T = _number(cfg, "schedule.num_train_timesteps")
    if T is not None and timesteps.max_timestep is not None and timesteps.max_timestep > T:
        raise ConfigError(f"module.timesteps.max_timestep={timesteps.max_timestep} exceeds "
                          f"schedule.num_train_timesteps={T} (it is exclusive: at most {T})")
    if loss.debiased_estimation and _number(cfg, "schedule.prediction_type") == "sample":
        raise ConfigError("module.loss.debiased_estimation=true needs schedule.prediction_type epsilon or "
                          "v_prediction, not sample")
    check_flow_options(cfg, loss)
    offset = _number(cfg, "module.offset_noise") or 0.0
    if offset > 0 and noise.pyramid_iterations > 0:
        raise ConfigError(f"module.offset_noise={offset} and module.noise.pyramid_iterations="
                          f"{noise.pyramid_iterations} cannot both be on (as in kohya-ss/sd-scripts); set one to 0")
    if _number(cfg, "module.compile"):
        try:
            check_backend(_number(cfg, "module.compile_backend") or "inductor")
        except ValueError as e:
            raise ConfigError(str(e)) from e


def check_prompt_file(cfg: DictConfig) -> None:
    """callbacks.sampling.prompt_file is read before the model and data are prepared (a bad line fails at once)."""
    from ldm.pipelines.prompt_file import PromptFileError, read_prompt_file

    path = OmegaConf.select(cfg, "callbacks.sampling.prompt_file", default=None)
    if path is not None:
        try:
            read_prompt_file(path)
        except PromptFileError as e:
            raise ConfigError(f"callbacks.sampling.prompt_file: {e}") from None


def check_flow_options(cfg: DictConfig, loss) -> None:
    """schedule=flow (flow matching): a velocity model samples with a flow sampler, and the SNR weightings of
    eps / v prediction do not apply (the objective says which setting to change)."""
    from ldm.diffusion.flow import FlowMatching
    from ldm.diffusion.objectives import FlowObjective
    from ldm.pipelines.sampling_options import FLOW_SAMPLERS

    is_flow = OmegaConf.select(cfg, "schedule._target_") == f"{FlowMatching.__module__}.{FlowMatching.__name__}"
    sampler = OmegaConf.select(cfg, "sampler.name")
    if sampler is not None and is_flow != (sampler in FLOW_SAMPLERS):
        raise ConfigError(f"sampler.name={sampler}: schedule={'flow' if is_flow else 'a noise schedule'} needs "
                          f"{'sampler=flow_euler' if is_flow else 'a sampler other than ' + sampler} (the training "
                          f"callbacks sample with it)")
    if is_flow:
        try:
            FlowObjective.check(_number(cfg, "module.min_snr_gamma"), loss)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def check_values(cfg: DictConfig) -> None:
    check_positive_int(cfg, "data.batch_size")
    check_positive_float(cfg, "optim.lr")
    check_val_check_interval(cfg)
    check_resolution(cfg)
    check_diffusion_options(cfg)
    check_prompt_file(cfg)
    from ldm.training.build.optimizers import check_lr_schedule
    from ldm.training.build.precision import check_precision

    for problem in (check_precision(cfg), check_lr_schedule(cfg)):
        if problem:
            raise ConfigError(problem)


# torchrun (torch >= 2.5) shares its rendezvous store with the ranks by default, and the static rendezvous
# (--master-addr / --node-rank) always does: every round hands the ranks the same store, which still holds the previous
# round's process-group keys (gloo's rank addresses, NCCL's unique id). A group restarted by ``--max-restarts`` reads
# its dead predecessors' addresses: seen here with gloo, the c10d rendezvous hung in ``init_process_group`` (2 ranks
# still waiting 3 minutes past a 60 s timeout), the static one failed ("connection refused", both agents out of
# restarts); pytorch/pytorch#135712 reports the NCCL side. With the c10d rendezvous and
# ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment every round gets a fresh store on rank 0, and the
# restart resumes exactly (tests/training/test_multinode.py).
def check_elastic_restarts(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a torchrun launch that may restart its ranks (--max-restarts > 0) on a shared rendezvous store."""
    try:
        restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return  # not torchrun's value: nothing of ours to check
    if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError(
            f"torchrun --max-restarts {restarts}: restarted ranks would read the killed group's addresses from the "
            "rendezvous store torchrun shares with them, and hang or fail in init_process_group "
            "(pytorch/pytorch#135712). Restart with the c10d rendezvous and a fresh store per round: "
            "`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --rdzv-backend c10d --rdzv-endpoint HOST:PORT "
            f"--max-restarts {restarts} ... train.py ckpt_path=auto` (the static rendezvous, --master-addr / "
            "--node-rank, always shares its store), or run without --max-restarts")
