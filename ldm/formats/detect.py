"""What is a model source? ``detect_source`` tells the formats apart by reading headers / key names only: pickled
files are never unpickled to detect them (their pickle opcodes are scanned)."""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path

from ldm.formats.safe_load import CheckpointError, load_state_dict, read_json_file
from ldm.formats.sd3_folder import transformer_pipeline
from ldm.formats.sd3_single_file import is_sd3_file
from ldm.formats.sharded_checkpoint import is_sharded_checkpoint
from ldm.formats.single_file import UNET_PREFIX as SD_UNET_PREFIX

SOURCE_KINDS = ("training_checkpoint", "ldm_bundle", "sd_single_file", "diffusers", "hub", "sd3_diffusers",
                "sd3_single_file", "flux_diffusers")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
TRAINING_UNET_PREFIX = "unet."
TRAINING_ADAPTER_PREFIX = "lora.loras."  # a LoRA run's checkpoint (ldm.training.module.diffusion_module)


def looks_like_hub_id(source) -> bool:
    s = str(source)
    return (not Path(s).exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) is not None
            and not s.lower().endswith(WEIGHT_SUFFIXES))


def detect_source(source) -> str:
    """One of SOURCE_KINDS. A missing local path -> FileNotFoundError; anything else unknown -> ValueError."""
    if isinstance(source, str) and not source.strip():
        raise ValueError("no model source given: expected a checkpoint file, export folder, diffusers folder or hub id")
    path = Path(source)
    if not path.exists():
        if looks_like_hub_id(source):
            return "hub"
        raise FileNotFoundError(f"model not found: {source} (no such file or folder, and not a hub id 'org/name')")
    if path.is_dir():
        if (path / "ldm_bundle.json").is_file():
            return "ldm_bundle"
        pipeline = transformer_pipeline(path)  # SD3 / SD3.5: transformer/ (an MMDiT), CLIP-L/G (+ T5); FLUX.1: a
        if pipeline is not None:                # Flux, CLIP-L + T5; both the 16-channel VAE without quant convs
            return pipeline
        if (path / "transformer").is_dir() and not (path / "unet").is_dir():
            raise ValueError(f"{path / 'model_index.json'}: _class_name = {_pipeline_name(path)!r}: a transformer "
                             "pipeline ldm does not read (it reads StableDiffusion3* and Flux* folders)")
        if (path / "model_index.json").is_file() or ((path / "unet").is_dir() and (path / "vae").is_dir()):
            return "diffusers"
        if is_sharded_checkpoint(path):  # trainer=fsdp2's checkpoint folder
            return "training_checkpoint"
        raise ValueError(f"{path}: folder is not a model: expected ldm_bundle.json (ldm export), "
                         "model_index.json / unet/ + vae/ (diffusers), transformer/ + vae/ (diffusers SD3 / FLUX.1) or "
                         ".metadata + meta.pt (a sharded checkpoint)")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unknown model file type {suffix!r}; expected one of {WEIGHT_SUFFIXES}, "
                         "an export folder or a diffusers folder")
    names = _safetensors_keys(path) if suffix == ".safetensors" else _pickle_strings(path)
    trained = any(n.startswith(TRAINING_UNET_PREFIX) for n in names) or (  # a LoRA run: the adapter only
        "adapter" in names and any(n.startswith(TRAINING_ADAPTER_PREFIX) for n in names)) or (
        "textual_inversion" in names and "textual_inversion.vectors" in names) or (  # a textual-inversion run
        "controlnet" in names and "controlnet.input_hint_block.0.weight" in names)  # a ControlNet run
    if trained and suffix != ".safetensors" and (
            {"ldm", "ldm_config", "hyper_parameters", "state_dict"} & names):
        return "training_checkpoint"
    if is_sd3_file(names):  # the same model.diffusion_model. prefix, an MMDiT under it (joint_blocks)
        return "sd3_single_file"
    if any(n.startswith(SD_UNET_PREFIX) for n in names):
        return "sd_single_file"
    raise ValueError(f"{path}: not a recognised checkpoint: expected 'model.diffusion_model.*' keys (Stable "
                     "Diffusion single file) or a Lightning 'state_dict' with 'unet.*' keys (ldm training checkpoint)")


def _pipeline_name(folder: Path):
    index = folder / "model_index.json"
    return read_json_file(index).get("_class_name") if index.is_file() else None


def _safetensors_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as err:  # SafetensorError from the Rust reader
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err


def _pickle_strings(path: Path) -> set[str]:
    """The string constants of a torch zip checkpoint's pickle (its keys), read without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                raise CheckpointError(f"{path}: not a torch checkpoint (zip without data.pkl)")
            data = zf.read(name)
        return {arg for _, arg, _ in pickletools.genops(io.BytesIO(data)) if isinstance(arg, str)}
    except zipfile.BadZipFile:  # legacy (pre-1.6) torch.save format: weights-only load
        state = load_state_dict(path)
        return set(state) | {"state_dict"}
    except (ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({err})") from err
