"""The metadata kohya sd-scripts writes into adapter files (LoRA, textual-inversion embeddings): Stability's
``modelspec.*`` keys and the ``sshs_*`` hashes of sd-webui-additional-networks.

References (kohya-ss/sd-scripts, read at commit 48d368f, 2026-02):
- ``library/sai_model_spec.py``: ``BASE_METADATA["modelspec.sai_model_spec"] = "1.0.1"``;
  ``determine_architecture`` (ARCH_* + "/lora" or "/textual-inversion");
  ``determine_implementation``: an SDXL LoRA, any textual inversion or a full checkpoint -> IMPL_STABILITY_AI
  (the generative-models URL), an SD1/SD2 LoRA -> IMPL_DIFFUSERS = "diffusers";
  ``build_metadata_dataclass``: ``prediction_type`` = "v" (v-parameterization) else "epsilon".
- ``library/model_util.py`` / ``library/sdxl_model_util.py``: ``ss_base_model_version`` ("sd_v1", "sd_v2", + "_v";
  "sdxl_base_v1-0").
- ``library/train_util.py`` ``precalculate_safetensors_hashes`` (called by ``networks/lora.py`` ``save_weights``
  for .safetensors LoRAs; sd-scripts' textual inversion writes no sshs_* keys): see :func:`sshs_hashes`.

Metadata is data: strings written and read, never executed.
"""

from __future__ import annotations

import hashlib
import time

from torch import Tensor, nn

SPEC_VERSION = "1.0.1"  # sai_model_spec.BASE_METADATA["modelspec.sai_model_spec"]

# ss_base_model_version values
SDXL_BASE_VERSION = "sdxl_base_v1-0"
ARCH_SD_V1, ARCH_SD_V2_512 = "stable-diffusion-v1", "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base"
ARCH_SD3 = "stable-diffusion-3"  # sai_model_spec.ARCH_SD3_M without its variant suffix ("-m", ...)
SD3_VERSION = "sd3"
FLUX_VERSION = "flux1"  # sd-scripts' flux_utils.MODEL_VERSION_FLUX_V1
ARCH_FLUX_1 = "flux-1"  # sai_model_spec.ARCH_FLUX_1_UNKNOWN (the dev / schnell variant is not inferred)
IMPL_FLUX = "https://github.com/black-forest-labs/flux"  # sai_model_spec.IMPL_FLUX
ADAPTERS = ("lora", "textual-inversion")  # sai_model_spec.ADAPTER_LORA / ADAPTER_TEXTUAL_INVERSION
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
# our prediction types -> sai_model_spec.PRED_TYPE_*; a flow-matching velocity has no model-spec value
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}


def infer_base_model_version(roots: dict[str, nn.Module], prediction_type: str = "epsilon") -> str:
    """kohya's ``ss_base_model_version`` of the model an adapter is for: SDXL (dual text encoder, or a U-Net with
    SDXL's vector input), SD2 (OpenCLIP's gelu text encoder; without one, a 1024-wide U-Net context), else SD1."""
    te, unet = roots.get("text_encoder"), roots.get("unet")
    unet_config = getattr(unet, "config", None) or {}
    if "num_single_layers" in unet_config:  # a Flux
        return FLUX_VERSION
    if "joint_attention_dim" in unet_config:  # an MMDiT (SD3)
        return SD3_VERSION
    if hasattr(te, "model_2") or unet_config.get("adm_in_channels"):
        return SDXL_BASE_VERSION
    text = getattr(te, "model", te)
    if text is not None and hasattr(text, "config"):
        v2 = getattr(text.config, "hidden_act", None) == "gelu"
    else:
        v2 = unet_config.get("context_dim") == 1024
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if prediction_type == "v_prediction" else "")


def model_spec_architecture(version: str, adapter: str = "lora") -> str:
    """``modelspec.architecture`` of an adapter for the base model ``version`` (determine_architecture)."""
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if version == SD3_VERSION:
        arch = ARCH_SD3
    elif version == FLUX_VERSION:
        arch = ARCH_FLUX_1
    elif version.startswith("sdxl"):
        arch = ARCH_SD_XL_V1_BASE
    elif version.startswith("sd_v2"):
        arch = ARCH_SD_V2_768_V if version.endswith("_v") else ARCH_SD_V2_512
    else:
        arch = ARCH_SD_V1
    return f"{arch}/{adapter}"


def model_spec_implementation(version: str, adapter: str = "lora") -> str:
    """``modelspec.implementation`` (determine_implementation): an SDXL LoRA or a textual inversion -> Stability's
    generative-models URL; an SD1/SD2 LoRA -> "diffusers"."""
    if version == FLUX_VERSION:
        return IMPL_FLUX
    if adapter == "textual-inversion" or version.startswith("sdxl"):
        return IMPL_STABILITY_AI
    return IMPL_DIFFUSERS


def model_spec(version: str, adapter: str, *, title: str, prediction_type: str = "epsilon",
               resolution: int | None = None) -> dict[str, str]:
    """The ``modelspec.*`` keys sd-scripts writes for an adapter of ``version`` (all strings). The date is UTC
    ISO-8601 to the second (sd-scripts: local time, same form); resolution only when known. A version that ends in
    "_v" (sd_v2_v) is a v-prediction model whatever ``prediction_type`` says."""
    if version.endswith("_v"):
        prediction_type = "v_prediction"
    meta = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": model_spec_architecture(version, adapter),
        "modelspec.implementation": model_spec_implementation(version, adapter),
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
    }
    if prediction_type in PREDICTION_TYPES:
        meta["modelspec.prediction_type"] = PREDICTION_TYPES[prediction_type]
    if resolution:
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    return meta


LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000  # addnet_hash_legacy: 64 KiB read from 1 MiB into the file


def sshs_hashes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` as sd-scripts' ``precalculate_safetensors_hashes`` computes them
    (the hashes sd-webui-additional-networks indexes a LoRA by):

    1. serialise ``tensors`` with ``safetensors.torch.save`` and only the ``ss_*`` metadata (user metadata may
       change later; the training metadata is meant to be immutable);
    2. model hash (``addnet_hash_safetensors``): sha256 of the bytes after the header (8-byte little-endian header
       length n, then n header bytes), hex digest;
    3. legacy hash (``addnet_hash_legacy``): sha256 of the 64 KiB from offset 1 MiB of those bytes (fewer, or none,
       for a smaller file), first 8 hex digits.
    ``tensors`` must be the tensors written, in their written dtypes.
    """
    from safetensors.torch import save

    data = save(tensors, {k: str(v) for k, v in metadata.items() if k.startswith("ss_")})
    start = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[start:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]}
