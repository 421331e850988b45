"""Original Stable Diffusion single-file checkpoints (``.ckpt`` / ``.safetensors``).

Layout: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.text_model.*`` (SD1, transformers CLIP) or
``cond_stage_model.model.*`` (SD2, OpenCLIP). Our UNet / VAE use the original
names, so they only need the prefix stripped.
"""

from __future__ import annotations

import re

from ldm.formats.openclip_keys import DROPPED, hf_to_openclip, openclip_num_layers, openclip_to_hf
from ldm.formats.safe_load import CheckpointError, load_state_dict, mismatch_report

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _ema_key(unet_key: str) -> str:
    """Original EMA name: ``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab``."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def split_sd_checkpoint(sd: dict, use_ema: bool = False) -> dict:
    """Split an SD1/SD2 single-file state dict into components.

    Returns ``{"unet", "vae", "text_encoder", "kind", "text_layers", "extra"}``:
    UNet / VAE keys in our layout, text encoder in transformers hub keys
    (``text_model.*``, all OpenCLIP blocks kept), ``kind`` "sd1" or "sd2",
    the file's text-encoder depth, and leftover keys (schedule buffers, EMA...).
    """
    unet_keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    if not unet_keys:
        raise CheckpointError("not a Stable Diffusion checkpoint: no 'model.diffusion_model.*' keys")
    if use_ema:
        missing = [k for k in unet_keys if _ema_key(k) not in sd]
        if missing:
            raise CheckpointError(f"use_ema=True but {len(missing)} UNet weights have no EMA copy, e.g. {missing[0]}")
        unet = {k[len(UNET_PREFIX):]: sd[_ema_key(k)] for k in unet_keys}
    else:
        unet = _strip(sd, UNET_PREFIX)
    vae = {k: v for k, v in _strip(sd, VAE_PREFIX).items() if not k.startswith("loss.")}

    sd2_text = _strip(sd, SD2_TEXT_PREFIX)
    sd1_text = _strip(sd, SD1_TEXT_PREFIX)
    if sd2_text:
        kind, text_layers = "sd2", openclip_num_layers(sd2_text)
        text = openclip_to_hf(sd2_text)
    else:
        text = {
            (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd1_text.items()
            if not k.endswith("position_ids")
        }
        text_layers = len({m.group(1) for k in text if (m := re.search(r"encoder\.layers\.(\d+)\.", k))})
        kind = "sd1" if sd1_text else _kind_from_unet(unet)

    used = {UNET_PREFIX, VAE_PREFIX, SD1_TEXT_PREFIX, SD2_TEXT_PREFIX}
    extra = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in used)}
    extra.update({VAE_PREFIX + k: v for k, v in _strip(sd, VAE_PREFIX).items() if k.startswith("loss.")})
    extra.update({SD2_TEXT_PREFIX + k: v for k, v in sd2_text.items() if k in DROPPED or k.startswith("visual.")})
    return {"unet": unet, "vae": vae, "text_encoder": text, "kind": kind,
            "text_layers": text_layers, "extra": extra}


def _kind_from_unet(unet: dict) -> str:
    """SD2 UNets use linear transformer projections and a 1024-wide context."""
    for key, value in unet.items():
        if key.endswith("attn2.to_k.weight"):
            return "sd2" if value.shape[1] == 1024 else "sd1"
        if key.endswith("proj_in.weight"):
            return "sd2" if value.ndim == 2 else "sd1"
    return "sd1"


def _text_model(text_encoder):
    """The transformers ``CLIPTextModel`` inside our wrapper (or the model itself)."""
    return getattr(text_encoder, "model", text_encoder)


def _text_state_for(text_encoder, parts: dict) -> dict:
    """Text-encoder weights of ``parts`` keyed like ``text_encoder``'s model."""
    from ldm.models.text_encoder import to_module_keys

    model = _text_model(text_encoder)
    text = parts["text_encoder"]
    depth = model.config.num_hidden_layers
    if parts["kind"] == "sd2" and parts["text_layers"] == depth + 1:
        # The SD2 text encoder uses the penultimate block output: the last block is unused.
        drop = f"text_model.encoder.layers.{depth}."
        text = {k: v for k, v in text.items() if not k.startswith(drop)}
    return to_module_keys(text, model)


def load_single_file(path, unet, vae=None, text_encoder=None, strict: bool = True,
                     use_ema: bool = False) -> dict:
    """Load an SD single file (path or state dict) into our modules.

    Every component is checked before anything is copied; problems in any of
    them are reported together in one ``CheckpointError``. Returns
    ``{"kind", "extra"}`` (extra = names of keys that were not used).
    """
    source = "<state dict>" if isinstance(path, dict) else str(path)
    sd = path if isinstance(path, dict) else load_state_dict(path)
    parts = split_sd_checkpoint(sd, use_ema=use_ema)
    jobs = [(unet, parts["unet"], "unet")]
    if vae is not None:
        jobs.append((vae, parts["vae"], "vae"))
    if text_encoder is not None:
        jobs.append((_text_model(text_encoder), _text_state_for(text_encoder, parts), "text_encoder"))
    reports = [mismatch_report(m, s, strict=strict, name=n) for m, s, n in jobs]
    reports = [r for r in reports if r]
    if reports:
        raise CheckpointError(f"cannot load {source}\n" + "\n".join(reports))
    for module, state, _ in jobs:
        module.load_state_dict(state, strict=False)
    return {"kind": parts["kind"], "extra": sorted(parts["extra"])}


def text_encoder_layout(text_encoder) -> str:
    """"sd2" (OpenCLIP layout) for gelu CLIP text models, else "sd1"."""
    return "sd2" if _text_model(text_encoder).config.hidden_act == "gelu" else "sd1"


def to_single_file(unet, vae=None, text_encoder=None, layout: str | None = None) -> dict:
    """Our modules -> an original-layout state dict (save with safetensors).

    The text encoder is written as SD1 ``cond_stage_model.transformer.text_model.*``
    or SD2 OpenCLIP ``cond_stage_model.model.*`` (``layout`` "sd1"/"sd2", default
    from its activation: gelu = OpenCLIP). SD2 files get only the blocks the
    model has (no unused 24th block, no ``text_projection``).
    """
    from ldm.models.text_encoder import to_hub_keys

    out = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    if vae is not None:
        out.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    if text_encoder is not None:
        hub = to_hub_keys(_text_model(text_encoder).state_dict())
        if (layout or text_encoder_layout(text_encoder)) == "sd2":
            out.update({SD2_TEXT_PREFIX + k: v for k, v in hf_to_openclip(hub).items()})
        else:
            out.update({SD1_TEXT_PREFIX + k: v for k, v in hub.items()})
    return {k: v.detach().contiguous() for k, v in out.items()}
