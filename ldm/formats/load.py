"""``load_bundle(source)``: any supported model source -> :class:`~ldm.formats.bundle.ModelBundle`.

What ``source`` may be (``detect_source`` tells them apart by reading headers / key names only):

- ``training_checkpoint``: a Lightning ``.ckpt`` of our training run (``state_dict`` with ``unet.*`` keys);
- ``ldm_bundle``: our export folder (``ldm_bundle.json``);
- ``sd_single_file``: an original Stable Diffusion ``.safetensors`` / ``.ckpt`` (``model.diffusion_model.*``);
  SD1 vs SD2 and the U-Net / VAE sizes come from the key shapes (or from the config that
  :func:`save_single_file` stores in the safetensors header); the schedule is SD's scaled_linear
  0.00085..0.012 with eps prediction unless ``prediction_type`` says otherwise (SD 2.x 768-v: "v_prediction");
- ``diffusers``: a folder with ``model_index.json`` or ``unet/`` + ``vae/``, or a hub id (``org/name``).

Pickled files are never unpickled to detect them (their pickle opcodes are scanned), and loaded with
``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.formats.bundle import ModelBundle
from ldm.formats.safe_load import CheckpointError, load_state_dict
from ldm.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule
from ldm.formats.safe_build import SCHEDULE_TARGET, build_network, build_node, json_object

SOURCE_KINDS = ("training_checkpoint", "ldm_bundle", "sd_single_file", "diffusers", "hub")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SD_UNET_PREFIX = "model.diffusion_model."
TRAINING_UNET_PREFIX = "unet."
TRAINING_ADAPTER_PREFIX = "lora.loras."  # a LoRA run's checkpoint (ldm.training.diffusion_module)
# Header keys of single files written by save_single_file: they make sizes, heads and schedule exact.
META_UNET, META_VAE = "ldm_unet_config", "ldm_vae_config"
META_SCHEDULE, META_RESOLUTION = "ldm_schedule", "ldm_resolution"
# Tokenizers for SD single files, which carry none.
DEFAULT_TOKENIZERS = {"sd1": ("openai/clip-vit-large-patch14", ""),
                      "sd2": ("stabilityai/stable-diffusion-2-1", "tokenizer")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def load_bundle(source, *, use_ema: bool = True, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None, text_encoder: Any = None, prediction_type: str | None = None,
                unet_config: dict | None = None, vae_config: dict | None = None) -> ModelBundle:
    """Load ``source`` (see the module docstring) as a ModelBundle on ``device`` in eval mode.

    use_ema: the EMA weights where the source has them (training checkpoints, SD files with ``model_ema.*``).
    device / dtype: "auto" picks CUDA (float16) when available, else CPU (float32).
    text_encoder: a CLIPTextEncoder, or a folder / hub id with ``tokenizer/`` + ``text_encoder/``; replaces the
    source's text encoder (an SD single file's text weights are loaded into it, since such files have no tokenizer).
    prediction_type: override the schedule's ("epsilon", "v_prediction", "sample").
    unet_config / vae_config: override constructor arguments inferred for an SD single file (e.g. num_heads).
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kind = detect_source(source)
    te = resolve_text_encoder(text_encoder)
    if kind == "sd_single_file":
        bundle = load_sd_single_file(source, use_ema=use_ema, text_encoder=te, prediction_type=prediction_type,
                                     unet_config=unet_config, vae_config=vae_config)
    elif kind in ("diffusers", "hub"):
        bundle = load_diffusers(source, text_encoder=te)
    elif kind == "training_checkpoint":
        try:
            from ldm.formats.training_checkpoint import load_training_checkpoint
        except ImportError as err:
            raise ImportError(f"{source} is a training checkpoint, but ldm.formats.training_checkpoint is not available "
                              f"({err})") from err
        bundle = load_training_checkpoint(source, use_ema=use_ema)
    else:  # ldm_bundle
        try:
            from ldm.formats.ldm_bundle import load_ldm_bundle
        except ImportError as err:
            raise ImportError(f"{source} is an ldm export bundle, but ldm.formats.ldm_bundle is not available "
                              f"({err})") from err
        bundle = load_ldm_bundle(source)
    if te is not None and kind != "sd_single_file":
        bundle.text_encoder = te
    if prediction_type is not None and prediction_type != bundle.schedule.prediction_type:
        bundle.schedule = with_prediction_type(bundle.schedule, prediction_type)
    bundle.meta.setdefault("format", kind)
    bundle.source = bundle.source or str(source)
    return bundle.to(device, dtype).eval()


# --------------------------------------------------------------------------------------------------------------
# what is it?


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
        if (path / "model_index.json").is_file() or ((path / "unet").is_dir() and (path / "vae").is_dir()):
            return "diffusers"
        raise ValueError(f"{path}: folder is not a model: expected ldm_bundle.json (ldm export) or "
                         "model_index.json / unet/ + vae/ (diffusers)")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unknown model file type {suffix!r}; expected one of {WEIGHT_SUFFIXES}, "
                         "an export folder or a diffusers folder")
    names = _safetensors_keys(path) if suffix == ".safetensors" else _pickle_strings(path)
    trained = any(n.startswith(TRAINING_UNET_PREFIX) for n in names) or (  # a LoRA run: the adapter only
        "adapter" in names and any(n.startswith(TRAINING_ADAPTER_PREFIX) for n in names))
    if trained and suffix != ".safetensors" and (
            {"ldm", "ldm_config", "hyper_parameters", "state_dict"} & names):
        return "training_checkpoint"
    if any(n.startswith(SD_UNET_PREFIX) for n in names):
        return "sd_single_file"
    raise ValueError(f"{path}: not a recognised checkpoint: expected 'model.diffusion_model.*' keys (Stable "
                     "Diffusion single file) or a Lightning 'state_dict' with 'unet.*' keys (ldm training checkpoint)")


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


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device | None = None) -> torch.dtype | None:
    """None keeps the weights' dtype; "auto" = float16 on CUDA, float32 elsewhere."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_text_encoder(text_encoder) -> nn.Module | None:
    """None, a module, or a folder / hub id holding ``tokenizer/`` + ``text_encoder/``."""
    if text_encoder is None or isinstance(text_encoder, nn.Module):
        return text_encoder
    from ldm.models.text_encoder import CLIPTextEncoder

    if not Path(text_encoder).is_dir() and not looks_like_hub_id(text_encoder):
        raise FileNotFoundError(f"text encoder folder not found: {text_encoder}")
    return CLIPTextEncoder.from_pretrained(text_encoder)


def with_prediction_type(schedule: NoiseSchedule, prediction_type: str) -> NoiseSchedule:
    return replace(schedule, prediction_type=prediction_type)


# --------------------------------------------------------------------------------------------------------------
# SD single files


def sd_schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
    """Stable Diffusion's training schedule: scaled_linear, beta 0.00085..0.012, T = 1000."""
    return NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012, prediction_type=prediction_type)


def load_sd_single_file(path, *, use_ema: bool = True, text_encoder: nn.Module | None = None,
                        prediction_type: str | None = None, unet_config: dict | None = None,
                        vae_config: dict | None = None) -> ModelBundle:
    from ldm.formats.single_file import load_single_file, split_sd_checkpoint

    path = Path(path)
    state = load_state_dict(path)
    header = _safetensors_metadata(path)
    sched = _json(header, META_SCHEDULE, path)
    schedule = (build_node({"_target_": SCHEDULE_TARGET, **sched}, "schedule", source=str(path), key=META_SCHEDULE)
                if sched else sd_schedule())
    ema = use_ema and any(k.startswith("model_ema.") for k in state)
    parts = split_sd_checkpoint(state, use_ema=ema)
    if not parts["vae"]:
        raise CheckpointError(f"{path}: no VAE weights ('first_stage_model.*'); this loader needs a full SD file")
    ucfg = {**(_json(header, META_UNET, path) or infer_unet_config(parts["unet"])), **(unet_config or {})}
    vcfg = {**(_json(header, META_VAE, path) or infer_vae_config(parts["vae"])), **(vae_config or {})}
    unet = _build("unet", ucfg, path, META_UNET if META_UNET in header else "inferred U-Net config", "unet_config")
    vae = _build("autoencoder", vcfg, path, META_VAE if META_VAE in header else "inferred VAE config", "vae_config")
    has_text = bool(parts["text_encoder"])
    te = text_encoder if text_encoder is not None else _default_text_encoder(path, parts)
    load_single_file(state, unet, vae, te if has_text else None, use_ema=ema)
    if prediction_type is not None:
        schedule = with_prediction_type(schedule, prediction_type)
    meta = {"format": "sd_single_file", "kind": parts["kind"], "ema": ema}
    if header.get(META_RESOLUTION):
        meta["resolution"] = int(header[META_RESOLUTION])
    return ModelBundle(unet, vae, te, schedule, source=str(path), meta=meta)


def _build(role: str, config: dict, path: Path, key: str, option: str):
    """Through the one safe builder: a header cannot make us import anything or allocate terabytes."""
    try:
        return build_network(role, config, source=str(path), key=key)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; fix it with {option}={{...}}") from err


def _safetensors_metadata(path: Path) -> dict:
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _json(header: dict, key: str, path: Path) -> dict | None:
    return json_object(header[key], source=f"{path} (header)", key=key) if header.get(key) else None


def _default_text_encoder(path: Path, parts: dict) -> nn.Module:
    """SD1: CLIP ViT-L/14 config; SD2: OpenCLIP ViT-H (23 layers); the tokenizer of the matching hub repo."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.models.text_encoder import CLIPTextEncoder, clip_text_config

    kind = parts["kind"]
    repo, sub = DEFAULT_TOKENIZERS[kind]
    hint = "pass text_encoder=<folder with tokenizer/ and text_encoder/, e.g. a diffusers SD folder>"
    if not parts["text_encoder"]:
        raise CheckpointError(f"{path}: no text-encoder weights in the file; {hint}")
    hidden = next(v.shape[1] for k, v in parts["text_encoder"].items() if k.endswith("token_embedding.weight"))
    config = clip_text_config("sd15" if kind == "sd1" else "sd21")
    if hidden != config.hidden_size:
        raise CheckpointError(f"{path}: text encoder of width {hidden} is not SD's ({config.hidden_size}); {hint}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder=sub)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{path}: SD single files carry no tokenizer and the default one ({repo}) is "
                                f"not available ({type(err).__name__}); {hint}") from err
    return CLIPTextEncoder(CLIPTextModel(config), tokenizer)


def _count(state: dict, pattern: str) -> int:
    """How many distinct values the (\\d+) group of ``pattern`` takes among the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_unet_config(state: dict) -> dict:
    """UNet constructor arguments from original-layout U-Net weights (prefix stripped).

    Heads cannot be read from weights: SD1's rule (8 heads) is used for conv projections, SD2's (64-wide heads)
    for linear ones; other models need ``unet_config={"num_heads": ...}`` or a file from save_single_file.
    """
    conv_in = state["input_blocks.0.0.weight"]  # (model_channels, in_channels, 3, 3)
    mc = conv_in.shape[0]
    level, per_level, mult, attn = 0, {}, {}, set()
    i = 1
    while any(k.startswith(f"input_blocks.{i}.") for k in state):
        if f"input_blocks.{i}.0.op.weight" in state:  # Downsample
            level += 1
        else:
            per_level[level] = per_level.get(level, 0) + 1
            mult[level] = state[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0] // mc
            if f"input_blocks.{i}.1.proj_in.weight" in state:
                attn.add(level)
        i += 1
    linear = state["middle_block.1.proj_in.weight"].ndim == 2
    context_dim = next(v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight"))
    heads = dict(num_heads=-1, num_head_channels=64) if linear else dict(num_heads=8, num_head_channels=-1)
    return dict(
        in_channels=conv_in.shape[1], out_channels=state["out.2.weight"].shape[0], model_channels=mc,
        channel_mult=[mult[lvl] for lvl in range(level + 1)], num_res_blocks=per_level[0],
        attention_levels=sorted(attn), transformer_depth=_count(state, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        context_dim=context_dim, use_linear_projection=linear, **heads,
    )


def infer_vae_config(state: dict) -> dict:
    """AutoencoderKL constructor arguments from original-layout VAE weights (scaling factor: SD's 0.18215)."""
    conv_in = state["encoder.conv_in.weight"]  # (base_channels, in_channels, 3, 3)
    base = conv_in.shape[0]
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    return dict(
        in_channels=conv_in.shape[1], out_channels=state["decoder.conv_out.weight"].shape[0],
        latent_channels=state["decoder.conv_in.weight"].shape[1], base_channels=base,
        channel_mult=[state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base for i in range(levels)],
        num_res_blocks=_count(state, r"encoder\.down\.0\.block\.(\d+)\."),
    )


def save_single_file(path, bundle: ModelBundle, resolution: int | None = None) -> Path:
    """Write an SD-layout ``.safetensors`` whose header also records the U-Net / VAE configs, the schedule and
    the training resolution, so :func:`load_bundle` rebuilds the model exactly (other tools ignore the header).
    The header is the single-file export's (``ldm.formats.exporter``), without its yaml."""
    from ldm.formats.single_file import to_single_file
    from ldm.formats.writers import save_safetensors, single_file_header

    header = single_file_header(bundle, resolution or 0, None)
    if not resolution:
        header.pop(META_RESOLUTION)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = to_single_file(bundle.unet, bundle.autoencoder, bundle.text_encoder)
    save_safetensors({k: v.cpu() for k, v in state.items()}, path, header)
    return path


# --------------------------------------------------------------------------------------------------------------
# diffusers folders and hub ids

_DIFFUSERS_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def schedule_from_diffusers(cfg: dict) -> NoiseSchedule:
    """``read_scheduler_config``'s dict -> NoiseSchedule."""
    kind = _DIFFUSERS_BETAS.get(cfg["beta_schedule"])
    if kind is None:
        raise ValueError(f"unsupported diffusers beta_schedule {cfg['beta_schedule']!r}; "
                         f"expected one of {sorted(_DIFFUSERS_BETAS)}")
    return NoiseSchedule.make(kind, cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"],
                              rescale_zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
                              prediction_type=cfg["prediction_type"])


def load_diffusers(source, *, text_encoder: nn.Module | None = None) -> ModelBundle:
    from ldm.formats.diffusers_folder import load_diffusers_folder, resolve_folder

    try:
        folder = resolve_folder(source)
    except Exception as err:  # offline, unknown repo, ...: huggingface_hub's many error types
        raise FileNotFoundError(f"model not found: {source} is no local folder and could not be fetched from the "
                                f"hub ({type(err).__name__}: {err})") from err
    components = ("unet", "vae") if text_encoder is not None else ("unet", "vae", "text_encoder")
    out = load_diffusers_folder(folder, components=components)
    missing = [c for c in components if out[c] is None]
    if missing:
        raise CheckpointError(f"{folder}: no {', '.join(m + '/' for m in missing)} folder"
                              + ("; pass text_encoder=<folder>" if missing == ["text_encoder"] else ""))
    te = text_encoder if text_encoder is not None else out["text_encoder"]
    meta: dict = {"format": "diffusers"}
    unet_cfg = folder / "unet" / "config.json"
    sample_size = json.loads(unet_cfg.read_text()).get("sample_size") if unet_cfg.is_file() else None
    if isinstance(sample_size, int):
        meta["resolution"] = sample_size * out["vae"].downsample_factor
    return ModelBundle(out["unet"], out["vae"], te, schedule_from_diffusers(out["scheduler"]),
                       source=str(source), meta=meta)
