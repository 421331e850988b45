"""A whole FLUX.1 diffusers folder (``FluxPipeline``: black-forest-labs/FLUX.1-dev, FLUX.1-schnell), read and
written:

    transformer/     FluxTransformer2DModel          -> our Flux (``flux_keys``)
    vae/             AutoencoderKL, 16 latent channels, no quant convs, latent = (z - 0.1159) * 0.3611
    text_encoder/    CLIPTextModel (CLIP-L, pooled output unprojected)   + tokenizer/
    text_encoder_2/  T5EncoderModel (T5-XXL), optional                    + tokenizer_2/   (without it the T5 tokens
                     are zeros)
    scheduler/       FlowMatchEulerDiscreteScheduler: FLUX.1-dev's dynamic shift (base_shift 0.5 at 256 tokens,
                     max_shift 1.15 at 4096), FLUX.1-schnell's shift 1.0; FluxPipeline's own sigmas
                     1, 1 - 1/n, ..., 1/n (our ``spacing="flux"``)
    model_index.json

as a ModelBundle (``load_flux_diffusers``: ``load_bundle`` / ``sample.py ckpt=``) or into configured networks
(``load_flux_folder_into``: ``model.pretrained=`` of model=flux_dev / flux_schnell / flux_tiny). Everything is read
as bounded data through SD3's folder readers (``sd3_folder``): each config bounded, its network counted on the meta
device and checked against the tensors its weight file holds before memory is allocated. ``write_flux_diffusers``
writes a Flux model (a training run's, ``python -m ldm.export --format diffusers``) as such a folder through SD3's
folder writer (``write_pipeline_folder``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.formats.common import ExportError
from ldm.formats.flux_keys import (flux_config_from_diffusers, flux_from_diffusers, read_flux_transformer,
                                   write_flux_transformer)
from ldm.formats.safe_load import CheckpointError, read_json_file
from ldm.formats.sd3_folder import (
    DIFFUSERS_VERSION,
    FLOW_SCHEDULER,
    TRANSFORMER_PIPELINES,
    built_from,
    clip_hub_state,
    fill_transformer_and_vae,
    load_pipeline_folder,
    load_text_weights_into,
    read_flow_scheduler,
    t5_state,
    transformer_pipeline,
    write_pipeline_folder,
    write_text_models,
)
from ldm.formats.weight_folder import FLUX_CLIP_SUBS, FLUX_T5_SUBS, check_flux_text_folders, read_weights
from ldm.models.bundle import ModelBundle

FLUX_PIPELINE = "FluxPipeline"
FLUX_TRANSFORMER = TRANSFORMER_PIPELINES["flux_diffusers"][1]
T5_LENGTH = 512  # FluxPipeline's max_sequence_length default (FLUX.1-schnell's model card samples with 256)
SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 128 latents x the VAE's factor (1024 px)
WHAT = "a FLUX.1 folder"
TEXT_ENCODER_TARGET = "ldm.models.text_encoder_flux.FluxTextEncoder.from_pretrained"


def is_flux_folder(path) -> bool:
    """A diffusers folder of FLUX.1's pipeline: model_index.json naming Flux*, or transformer/ + vae/ with a
    FluxTransformer2DModel (``sd3_folder.transformer_pipeline``)."""
    return transformer_pipeline(path) == "flux_diffusers"


def check_flux_transformer_class(folder: Path) -> None:
    """transformer/config.json names FluxTransformer2DModel (read before anything is built from it)."""
    path = Path(folder) / "transformer" / "config.json"
    config = read_json_file(path)
    name = config.get("_class_name", FLUX_TRANSFORMER) if isinstance(config, dict) else config
    if name != FLUX_TRANSFORMER:
        raise CheckpointError(f"{path}: _class_name = {name!r}; {WHAT}'s transformer is a {FLUX_TRANSFORMER}")


def read_flux_schedule(folder):
    """The folder's FlowMatchEulerDiscreteScheduler with FluxPipeline's sigmas (spacing="flux"), bounded."""
    return read_flow_scheduler(folder, what=WHAT, spacing="flux")


def load_flux_text_encoder(folder, *, joint_dim: int, use_t5: bool = True, t5_length: int = T5_LENGTH,
                           **options) -> nn.Module:
    """FluxTextEncoder of a folder's CLIP-L (+ its T5 when the folder has ``text_encoder_2/`` and use_t5), each
    checked against its weights before transformers allocates it."""
    from ldm.models.text_encoder_flux import FluxTextEncoder

    folder = Path(folder)
    t5 = check_flux_text_folders(folder, use_t5)
    try:
        return FluxTextEncoder.from_pretrained(folder, use_t5=t5, joint_dim=joint_dim, t5_length=t5_length,
                                               **options)
    except ValueError as err:  # its T5 is not as wide as the transformer's context
        raise CheckpointError(f"{folder}: {err}") from err


def load_flux_diffusers(source, *, text_encoder=None, use_t5: bool = True,
                        t5_length: int = T5_LENGTH) -> ModelBundle:
    """A whole FLUX.1 folder -> ModelBundle (Flux, its 16-channel VAE, FluxTextEncoder, FlowMatching of its
    scheduler with FluxPipeline's sigmas). text_encoder: a FluxTextEncoder to use instead of the folder's, or another
    FLUX.1 folder to take them from."""
    check_flux_transformer_class(source)

    def text(unet):
        if isinstance(text_encoder, nn.Module):
            return text_encoder
        return load_flux_text_encoder(source if text_encoder is None else text_encoder, use_t5=use_t5,
                                      joint_dim=unet.config["joint_attention_dim"], t5_length=t5_length)

    return load_pipeline_folder(source, "flux_diffusers", read_flux_transformer, text, read_flux_schedule(source),
                                sample_size=SAMPLE_SIZE)


def load_flux_folder_into(source, unet: nn.Module, autoencoder: nn.Module | None = None,
                          text_encoder: nn.Module | None = None) -> None:
    """Fill configured networks (fine-tuning: ``model.pretrained=<FLUX.1 folder>``) strictly from a FLUX.1 folder:
    the configured Flux / VAE must be the folder's (a clear error names the ``model.*`` key), the text encoder a
    FluxTextEncoder (model=flux_dev's: built from the folder itself, then not read twice)."""
    from ldm.models.flux import Flux
    from ldm.models.text_encoder_flux import FluxTextEncoder

    folder = Path(source)
    if not isinstance(unet, Flux):
        raise CheckpointError(f"{folder}: {WHAT}'s transformer loads into a Flux (model=flux_dev, flux_schnell, "
                              f"flux_tiny), not a {type(unet).__name__}")
    check_flux_transformer_class(folder)
    fill_transformer_and_vae(folder, unet, autoencoder, flux_config_from_diffusers, flux_from_diffusers)
    if text_encoder is None or built_from(text_encoder, folder):
        return
    if not isinstance(text_encoder, FluxTextEncoder):
        raise CheckpointError(
            f"{folder}: {WHAT}'s text encoders (CLIP-L + T5) load into a FluxTextEncoder, not the configured "
            f"{type(text_encoder).__name__}: set model.text_encoder._target_={TEXT_ENCODER_TARGET} "
            f"+model.text_encoder.path_or_hub_id=<the folder> (model=flux_dev's text encoder)")
    t5 = check_flux_text_folders(folder, use_t5=text_encoder.t5 is not None)
    clip = read_weights(folder / FLUX_CLIP_SUBS[0][0], "model")
    load_text_weights_into(text_encoder, [clip], read_weights(folder / FLUX_T5_SUBS[0], "model") if t5 else None,
                           source=str(folder), kind=FluxTextEncoder)


# ---------------------------------------------------------------------------------------------- writing


def check_flux(bundle: ModelBundle) -> None:
    """What a FluxPipeline folder cannot represent, found before anything is written."""
    from ldm.formats.flux_keys import flux_diffusers_config
    from ldm.models.flux import Flux
    from ldm.models.text_encoder_flux import FluxTextEncoder

    if not isinstance(bundle.unet, Flux):
        raise ExportError(f"{WHAT} holds a Flux; this model's denoiser is {type(bundle.unet).__name__}")
    try:
        flux_diffusers_config(bundle.unet.config)  # FluxTransformer2DModel packs 2 x 2 patches
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    schedule = bundle.schedule
    if getattr(schedule, "spacing", None) != "flux":  # FluxPipeline passes its own sigmas 1, 1 - 1/n, ..., 1/n
        raise ExportError(f"FluxPipeline samples with the sigmas 1, 1 - 1/n, ..., 1/n (schedule.spacing=flux); this "
                          f"model's schedule is {type(schedule).__name__} with spacing="
                          f"{getattr(schedule, 'spacing', None)!r}: it would not sample as trained")
    if not hasattr(bundle.autoencoder, "encoder"):
        raise ExportError(f"{WHAT} holds a KL autoencoder (vae/); this model has none")
    if not isinstance(bundle.text_encoder, FluxTextEncoder):
        raise ExportError(f"{WHAT} holds FLUX.1's text encoders (CLIP-L + T5); this model's is "
                          f"{type(bundle.text_encoder).__name__}")


def write_flux_text_encoder(text_encoder: nn.Module, folder: Path, dtype: torch.dtype | None = None) -> list[str]:
    """``text_encoder/`` (CLIPTextModel) + ``tokenizer/``, and ``text_encoder_2/`` (T5) + ``tokenizer_2/`` when the
    encoder has a T5."""
    (clip_sub, clip_tok), (t5_sub, t5_tok) = FLUX_CLIP_SUBS[0], FLUX_T5_SUBS
    parts = [(clip_sub, clip_tok, text_encoder.model, text_encoder.tokenizer, "CLIPTextModel",
              clip_hub_state(text_encoder.model))]
    if text_encoder.t5 is not None:
        parts.append((t5_sub, t5_tok, text_encoder.t5, text_encoder.t5_tokenizer, "T5EncoderModel",
                      t5_state(text_encoder.t5)))
    return write_text_models(parts, folder, dtype)


def flux_model_index(text_encoder: nn.Module, t5: bool) -> dict:
    """``model_index.json`` of a FluxPipeline (no T5: text_encoder_2 / tokenizer_2 null, as diffusers saves it)."""
    none = [None, None]
    return {"_class_name": FLUX_PIPELINE, "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", FLOW_SCHEDULER], "transformer": ["diffusers", FLUX_TRANSFORMER],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", type(text_encoder.tokenizer).__name__],
            "text_encoder_2": ["transformers", "T5EncoderModel"] if t5 else none,
            "tokenizer_2": ["transformers", type(text_encoder.t5_tokenizer).__name__] if t5 else none,
            "image_encoder": none, "feature_extractor": none}


def write_flux_diffusers(bundle: ModelBundle, folder, *, frozen: bool = True, dtype: torch.dtype | None = None,
                         resolution: int | None = None) -> list[str]:
    """A FluxPipeline folder that ``FluxPipeline.from_pretrained`` loads unchanged (and ``load_flux_diffusers``
    reads back); ``frozen=False`` writes only ``transformer/``, ``scheduler/`` and ``model_index.json``."""
    check_flux(bundle)
    te = bundle.text_encoder
    return write_pipeline_folder(bundle, folder, write_flux_transformer, write_flux_text_encoder,
                                 flux_model_index(te, frozen and te.t5 is not None), frozen=frozen, dtype=dtype,
                                 resolution=resolution)
