"""SDXL's text encoders in the original (SGM) single-file layout <-> transformers keys.

SGM ``sd_xl_base.yaml``'s ``GeneralConditioner`` stores its embedders under ``conditioner.embedders.<i>.``:
0 = ``FrozenCLIPEmbedder`` (transformers CLIP ViT-L: ``conditioner.embedders.0.transformer.text_model.*``),
1 = ``FrozenOpenCLIPEmbedder2`` (OpenCLIP ViT-bigG: ``conditioner.embedders.1.model.*``, the SD2 layout of
``openclip_keys`` plus ``text_projection``, a (width, proj) matrix applied as ``x @ text_projection``, i.e. the
transpose of transformers' ``text_projection.weight``; diffusers ``convert_open_clip_checkpoint`` does the same).
"""

from __future__ import annotations

from ldm.formats.common import strip_prefix
from ldm.formats.openclip_keys import hf_to_openclip, openclip_to_hf

SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."
PROJECTION = "text_projection.weight"


def is_sdxl_file(state: dict) -> bool:
    return any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in state)


def split_sdxl_text(state: dict) -> tuple[dict, dict]:
    """(ViT-L hub keys ``text_model.*``, bigG ``CLIPTextModelWithProjection`` hub keys) of an SDXL file."""
    text = {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in strip_prefix(state, SDXL_TEXT_PREFIX).items() if not k.endswith("position_ids")}
    oc = strip_prefix(state, SDXL_TEXT_2_PREFIX)
    text_2 = openclip_to_hf(oc) if oc else {}
    if "text_projection" in oc:
        text_2[PROJECTION] = oc["text_projection"].t().contiguous()
    return text, text_2


def sdxl_text_to_single_file(text_hub: dict, text_2_hub: dict) -> dict:
    """Hub keys of the two encoders -> ``conditioner.embedders.{0,1}.*`` (the inverse of split_sdxl_text)."""
    out = {SDXL_TEXT_PREFIX + k: v for k, v in text_hub.items()}
    rest = {k: v for k, v in text_2_hub.items() if k != PROJECTION}
    out.update({SDXL_TEXT_2_PREFIX + k: v for k, v in hf_to_openclip(rest).items()})
    if PROJECTION in text_2_hub:
        out[SDXL_TEXT_2_PREFIX + "text_projection"] = text_2_hub[PROJECTION].t().contiguous()
    return out
