"""The two kinds of run ``cfg.stage`` names, and what each does around the shared fit:

- ``diffusion`` (the seed's latent diffusion): resolve the auto defaults and the caption vocabulary, build
  LatentDiffusion (U-Net + frozen VAE + text encoder, or an adapter on them), fill DreamBooth's class folder, encode
  the latent cache, record the training resolution / buckets in the model config;
- ``autoencoder`` (the first stage): build the VAE's module; at the end calibrate its scaling factor and write it.

``train(cfg)`` calls the same steps of either kind and never checks ``cfg.stage`` itself."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.training.run.config_checks import ConfigError


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


def autos_without_data(cfg: DictConfig) -> None:
    """``model.*`` = auto that train() has not chosen from the data: as without data/fit/auto.yaml, the pretrained
    run's or the preset's own (its first stage, its text encoder's words, frozen)."""
    from ldm.training.run.auto_defaults import AUTO
    from ldm.training.run.caption_vocab import own_text_encoder
    from ldm.training.run.first_stage import weights_without_data

    if OmegaConf.select(cfg, "model.autoencoder.weights", default=None) == AUTO:
        OmegaConf.update(cfg, "model.autoencoder.weights", weights_without_data(cfg))
    if AUTO in (OmegaConf.select(cfg, "model.text_encoder.words", default=None),
                OmegaConf.select(cfg, "model.text_encoder.frozen", default=None)):
        own_text_encoder(cfg)


def quantize_frozen_base(bundle, precision: str | None, adapter) -> None:
    """model.quantize_base=int8|nf4|fp8: the frozen U-Net's and text encoder's Linear layers stored quantized
    (ldm.models.quantized_base); only an adapter run has a frozen base to quantize."""
    if not precision:
        return
    from ldm.models.quantized_base import PRECISIONS, quantize_base_

    if precision not in PRECISIONS:
        raise ConfigError(f"model.quantize_base must be null or one of {PRECISIONS}, got {precision!r}")
    if adapter is None:
        raise ConfigError(f"model.quantize_base={precision} stores a frozen base: it needs an adapter "
                          "(adapter=lora); a full fine-tune trains the base's weights")
    for network in (bundle.unet, bundle.text_encoder):
        if network is not None:
            quantize_base_(network, precision)


def build_diffusion_module(cfg: DictConfig) -> L.LightningModule:
    from ldm.training.build.factories import build_bundle

    autos_without_data(cfg)  # model.* = auto that train() did not choose from the data (a module built directly)
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
    quantize_frozen_base(bundle, m.get("quantize_base"), adapter)
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


def _progress(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True))


def _named(step: Callable[[], Any]) -> Any:
    """Run a step whose bad values surface as ValueError, reporting them as the config's (ConfigError)."""
    try:
        return step()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _reading_data(step: Callable[[], Any]) -> Any:
    """A step that reads the training data: what fails while the data is read names data.train (a bad config value
    the step finds is a ConfigError naming its own key)."""
    try:
        return step()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the data could not be read: name the key
        raise ConfigError(f"data.train: {type(e).__name__}: {e}") from e


@contextmanager
def _quiet_data() -> Iterator[None]:
    """The data's warnings (captions missing, rows not UTF-8, ...) held back while it is read to choose the auto
    values, so that each is said once, by the run."""
    logger = logging.getLogger("ldm.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def say_choices(lines: list[str]) -> None:
    """What the auto values became and why, as one block at the start of the run."""
    if lines:
        print("chosen for your data (auto values; any value you set is kept):\n" + "\n".join(f"  {x}" for x in lines))


class DiffusionStage:
    name = "diffusion"

    def resolve_config(self, cfg: DictConfig) -> None:
        """The auto values, chosen from the data and said in one block: model.autoencoder.weights (the shipped VAE,
        or a first stage trained first when it fails the VAE check), model.text_encoder.words / frozen, then
        data.batch_size / trainer.max_steps / sampling cadence; model.text_encoder.words = captions -> the
        captions' words."""
        from ldm.training.run.auto_defaults import choose_bucket_step, choose_resolution, resolve_auto
        from ldm.training.run.caption_vocab import choose_text_encoder, resolve_caption_vocab
        from ldm.training.run.first_stage import choose_first_stage

        with _quiet_data():  # the run reads the data again when it starts and says what is wrong with it then
            lines = [_reading_data(lambda: choose_resolution(cfg)), _reading_data(lambda: choose_first_stage(cfg)),
                     choose_bucket_step(cfg), _reading_data(lambda: choose_text_encoder(cfg))]  # step: knows the VAE
            _reading_data(lambda: resolve_auto(cfg, say=lines.append))
            _named(lambda: resolve_caption_vocab(cfg))
        say_choices([line for line in lines if line])

    def build_module(self, cfg: DictConfig) -> L.LightningModule:
        return build_diffusion_module(cfg)

    def before_data(self, cfg: DictConfig, module: L.LightningModule) -> None:
        """data=dreambooth: the class folder filled with base-model samples first."""
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        from ldm.training.run.class_images import ensure_class_images

        _named(lambda: ensure_class_images(cfg, module, rank=rank_zero_only.rank, progress=_progress(cfg)))

    def before_fit(self, cfg: DictConfig, module: L.LightningModule, datamodule: Any) -> None:
        """The latent cache encoded (every rank encoding its share); the training resolution and buckets recorded, so every
        checkpoint and export carries them whatever the data source."""
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        from ldm.data.auto_cache import PART_SIZE
        from ldm.training.run.latent_prep import cache_device, encode_training_set
        from ldm.training.run.resolution import training_buckets, training_resolution

        if getattr(datamodule, "latent_cache", None):
            part_size = getattr(datamodule, "latent_cache_part_size", None) or PART_SIZE
            _named(lambda: encode_training_set(module, datamodule, datamodule.latent_cache, rank=rank_zero_only.rank,
                                               seed=cfg.seed, progress=_progress(cfg), part_size=part_size,
                                               precision=getattr(datamodule, "latent_cache_dtype", "auto"),
                                               device=cache_device(cfg.trainer.get("accelerator"),
                                                                   cfg.trainer.get("devices"))))
        module.model_config["resolution"] = (training_resolution(datamodule, module.autoencoder)
                                             or module.model_config.get("resolution"))
        buckets = training_buckets(datamodule)
        if buckets is not None:  # aspect-ratio buckets: their table and max area too
            module.model_config["buckets"] = buckets

    def results(self, module: L.LightningModule, datamodule: Any, run_dir: Path) -> dict[str, Any]:
        """The files the trained part wrote (an adapter file, embeddings)."""
        return {"files": dict(module.written_files)} if module.written_files else {}


class AutoencoderStage:
    name = "autoencoder"

    def resolve_config(self, cfg: DictConfig) -> None:
        """Only the resolution can be auto here (data=folder / hf / webdataset under a first-stage experiment)."""
        from ldm.training.run.auto_defaults import choose_bucket_step, choose_resolution

        with _quiet_data():
            lines = [_reading_data(lambda: choose_resolution(cfg)), choose_bucket_step(cfg)]
            say_choices([line for line in lines if line])

    def build_module(self, cfg: DictConfig) -> L.LightningModule:
        return build_autoencoder_module(cfg)

    def before_data(self, cfg: DictConfig, module: L.LightningModule) -> None:
        """No class images."""

    def before_fit(self, cfg: DictConfig, module: L.LightningModule, datamodule: Any) -> None:
        """Pixels are the training data: no cache to encode."""

    def results(self, module: L.LightningModule, datamodule: Any, run_dir: Path) -> dict[str, Any]:
        """The scaling factor calibrated on the training data, and the VAE file the diffusion stage loads."""
        from ldm.formats.autoencoder_file import save_autoencoder
        from ldm.training.build.factories import calibrate_scaling_factor

        scaling = calibrate_scaling_factor(module.autoencoder, datamodule.train_dataloader())
        return {"scaling_factor": scaling,
                "autoencoder": str(save_autoencoder(module.autoencoder, run_dir / "autoencoder.safetensors"))}


STAGE_KINDS = {s.name: s for s in (DiffusionStage(), AutoencoderStage())}
