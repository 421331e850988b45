"""``sample(cfg) -> list[Path]``: the body of ``sample.py``, callable without Hydra.

The config schema is :class:`SampleConfig` (registered with Hydra's ConfigStore as ``sample_schema``; unknown
keys are rejected). Every check that needs no model runs before the model is loaded, and the size checks run
before anything is sampled, so bad input fails fast with a message naming the option to fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from ldm.diffusion.schedules import PREDICTION_TYPES
from ldm.formats.detect import detect_source, looks_like_hub_id
from ldm.formats.load import load_bundle, resolve_device, resolve_dtype
from ldm.formats.shared_names import shared_name
from ldm.pipelines.common import check_size, default_size, unet_kind
from ldm.pipelines.images import labelled_grid, make_grid, mask_batch, pil_to_tensor, to_pil
from ldm.pipelines.png import save_png
from ldm.pipelines.prompt_file import PromptFileError, SamplePrompt, read_prompt_file, sampler_for
from ldm.pipelines.sampling_options import SamplingOptions

IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.75, 1.0


@dataclass
class SampleConfig:
    # Every key of configs/sample.yaml and its default: this class is the one place they are written (sample.yaml
    # only picks the sampler and keeps Hydra from writing a run folder; `python sample.py --cfg job` prints them).
    ckpt: str = MISSING  # the model: training .ckpt, export folder, SD .safetensors/.ckpt, diffusers folder or hub id
    prompt: Optional[str] = None  # one prompt ...
    prompt_file: Optional[str] = None  # ... or a file with one prompt per line, each with its own settings in kohya's
    # format (a red circle --n blurry --w 512 --h 768 --d 42 --l 7 --s 30 --ss euler_a): ldm.pipelines.prompt_file
    negative_prompt: str = ""  # the unconditional branch of CFG ("" = the empty prompt)
    n_images: int = 1  # images per prompt
    batch_size: int = 1  # images per model call; batch j uses seed + (index of its first image)
    seed: int = 0
    sampler: SamplingOptions = field(default_factory=SamplingOptions)  # configs/sampler/ (ddim_diffusers: SD's)
    guidance_scale: float = 7.5  # classifier-free guidance weight w (1 = conditional prediction only)
    height: Optional[int] = None  # default: the init image's size, else the model's training resolution, else 512
    width: Optional[int] = None
    init_image: Optional[str] = None  # image-to-image (or inpainting with mask)
    strength: Optional[float] = None  # fraction of the steps that run (0 = VAE round trip, 1 = from pure noise);
    # default 0.75 for image-to-image, 1.0 for inpainting
    mask: Optional[str] = None  # inpainting: white = repaint; same size as init_image
    feather: int = 0  # inpainting: soften the composite edge over this many pixels inside the mask
    out_dir: str = "samples"  # PNGs (with their parameters in a text chunk) and grid.png
    overwrite: bool = False  # an out_dir holding an earlier run's images is refused unless true (then they go first)
    grid: bool = True  # also write grid.png
    use_ema: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    dtype: str = "auto"  # auto (float16 on CUDA, else float32) | float32 | float16 | bfloat16
    text_encoder: Optional[str] = None  # tokenizer/ + text_encoder/ folder (SD single files carry no tokenizer)
    max_chunks: Optional[int] = None  # long prompts: up to 75 x N tokens (A1111 chunks); null: the model's (1 = 75)
    prediction_type: Optional[str] = None  # override: epsilon | v_prediction (SD 2.x 768-v single files)
    t5: bool = True  # SD3 / FLUX.1: false samples without the T5 encoder (its tokens zeros, as SD3's diffusers
    # pipeline with text_encoder_3=None)
    check_memory: bool = True  # estimate the activation memory first; refuse (saying what to lower) if it won't fit
    lora: list[str] = field(default_factory=list)  # LoRA files merged in (kohya / diffusers), each FILE or FILE:SCALE:
    # lora=[a.safetensors,b.safetensors:0.5]
    embeddings: list[str] = field(default_factory=list)  # textual-inversion files, each FILE or FILE:TOKEN; the
    # prompt uses the token (the key of a diffusers learned_embeds file, else the file stem):
    # embeddings=[run/learned_embeds.safetensors]
    controlnet: Any = None  # ControlNet(s): a diffusers ControlNetModel folder or a control_model.* file, or a list
    control_image: Any = None  # one control image (PNG) per ControlNet; resized to the output's size
    control_scale: Any = None  # residual scale, one for all or one per ControlNet (default 1.0)
    control_start: Any = None  # fraction of the steps where each ControlNet starts (default 0) ...
    control_end: Any = None  # ... and ends (default 1): diffusers' control_guidance_start / _end


class SampleConfigError(ValueError):
    """A sample.py option is wrong; the message names it."""


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (``defaults: [sample_schema, ...]`` in configs/sample.yaml)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def typed_config(cfg: Any) -> DictConfig:
    """cfg (dict / DictConfig) merged onto the schema: unknown keys (even ones forced in with Hydra's ``+key=``)
    and wrong types are errors."""
    if isinstance(cfg, DictConfig):  # plain data first: a typed DictConfig would carry its extra keys along
        cfg = OmegaConf.to_container(cfg, resolve=False)
    try:
        return OmegaConf.merge(OmegaConf.structured(SampleConfig), cfg)
    except Exception as err:  # omegaconf's ConfigKeyError / ValidationError
        raise SampleConfigError(f"bad sample config: {err}") from err


# --------------------------------------------------------------------------------------------------------------
# checks that need no model


def _existing_file(path: str | None, option: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{option}: file not found: {path}")
    return p


def read_prompts(cfg: DictConfig) -> list[SamplePrompt]:
    """``prompt``, or the prompts of ``prompt_file``: one a line, each with the settings its line gives in kohya's
    format (``ldm.pipelines.prompt_file``: --n --w --h --d --l --s --ss), the options' where it gives none."""
    if cfg.prompt is not None and cfg.prompt_file is not None:
        raise SampleConfigError("give prompt=... or prompt_file=..., not both")
    if cfg.prompt_file is not None:
        path = _existing_file(cfg.prompt_file, "prompt_file")
        try:
            return read_prompt_file(path)
        except PromptFileError as err:
            raise SampleConfigError(f"prompt_file: {err}") from None
    if cfg.prompt is None:
        raise SampleConfigError('no prompt given: set prompt="..." or prompt_file=<file with one prompt per line>')
    return [SamplePrompt(cfg.prompt)]


def _open_image(path: Path, option: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)  # a copy, turned upright by its EXIF orientation
    except (UnidentifiedImageError, OSError) as err:
        raise SampleConfigError(f"{option}: cannot read image {path} ({err})") from err


def read_images(cfg: DictConfig):
    """(init image, mask) as PIL images or None, resized to height/width when those are given."""
    init_path = _existing_file(cfg.init_image, "init_image")
    mask_path = _existing_file(cfg.mask, "mask")
    if mask_path is not None and init_path is None:
        raise SampleConfigError("mask needs init_image (the image to inpaint)")
    if init_path is None:
        return None, None
    init = _open_image(init_path, "init_image").convert("RGB")
    mask = _open_image(mask_path, "mask").convert("L") if mask_path is not None else None
    if mask is not None and mask.size != init.size:
        raise SampleConfigError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but init_image {init_path} is "
                                f"{init.size[0]}x{init.size[1]}; they must be the same size")
    size = (cfg.width or init.size[0], cfg.height or init.size[1])
    if size != init.size:
        from PIL import Image

        init = init.resize(size, Image.Resampling.LANCZOS)
        mask = mask.resize(size, Image.Resampling.NEAREST) if mask is not None else None
    return init, mask


def read_control_specs(cfg: DictConfig):
    from ldm.pipelines.control_options import ControlOptionError, control_specs

    try:
        return control_specs(cfg.controlnet, cfg.control_image, cfg.control_scale, cfg.control_start,
                             cfg.control_end)
    except ControlOptionError as err:
        raise SampleConfigError(str(err)) from None


def check_options(cfg: DictConfig) -> None:
    """Numbers, names and paths that can be judged without the model."""
    if OmegaConf.is_missing(cfg, "ckpt") or not str(cfg.ckpt).strip():
        raise SampleConfigError("no model given: set ckpt=<checkpoint file, export folder, diffusers folder or "
                                "hub id>")
    detect_source(cfg.ckpt)  # missing path -> FileNotFoundError; unknown file -> ValueError (reads headers only)
    for option in ("n_images", "batch_size"):
        if cfg[option] < 1:
            raise SampleConfigError(f"{option} must be >= 1, got {cfg[option]}")
    if cfg.strength is not None and not 0.0 <= cfg.strength <= 1.0:
        raise SampleConfigError(f"strength must be in [0, 1], got {cfg.strength}")
    if cfg.feather < 0:
        raise SampleConfigError(f"feather must be >= 0 pixels, got {cfg.feather}")
    for option in ("height", "width"):
        if cfg[option] is not None and cfg[option] < 1:
            raise SampleConfigError(f"{option} must be a positive number of pixels, got {cfg[option]}")
    if not math.isfinite(cfg.guidance_scale) or cfg.guidance_scale < 0:
        raise SampleConfigError(f"guidance_scale must be a finite number >= 0 (1 = the conditional prediction only, "
                                f"0 = unconditional, 7.5 = SD's default), got {cfg.guidance_scale}")
    try:
        SamplingOptions.of(cfg.sampler)
        device = resolve_device(cfg.device)
        resolve_dtype(cfg.dtype, device)
    except (ValueError, RuntimeError) as err:
        raise SampleConfigError(f"sampler / device / dtype: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleConfigError(f"device={cfg.device} but CUDA is not available; use device=auto or device=cpu")
    if cfg.prediction_type is not None and cfg.prediction_type not in PREDICTION_TYPES:
        raise SampleConfigError(f"prediction_type must be one of {PREDICTION_TYPES} (or null), got "
                                f"{cfg.prediction_type!r}")
    from ldm.formats.embeddings import parse_embedding_spec

    for spec in cfg.embeddings:
        _existing_file(parse_embedding_spec(spec)[0], "embeddings")
    if cfg.max_chunks is not None and not 1 <= cfg.max_chunks <= 64:
        raise SampleConfigError(f"max_chunks must be in [1, 64] chunks of 75 tokens (or null: the model's), got "
                                f"{cfg.max_chunks}")
    te = cfg.text_encoder
    if te is not None and not Path(te).is_dir() and not looks_like_hub_id(te):
        raise FileNotFoundError(f"text_encoder: folder not found: {te}")
    read_control_specs(cfg)  # counts, files and ranges of the ControlNet options


def set_max_chunks(bundle, max_chunks: int) -> None:
    """sample.py max_chunks=N: prompts of up to 75 x N tokens (the model's text encoder setting otherwise)."""
    te = bundle.text_encoder
    if te is None:
        raise SampleConfigError("max_chunks: this model has no CLIP text encoder (an unconditional model)")
    te.max_chunks = int(max_chunks)
    te._clear_cache()


def skip_t5(bundle) -> None:
    """sample.py t5=false: SD3's or FLUX.1's context without the T5 (zeros in its place, as diffusers' pipeline
    without text_encoder_3); its memory is freed."""
    from ldm.models.text_encoder_flux import FluxTextEncoder
    from ldm.models.text_encoder_sd3 import SD3TextEncoder

    if not isinstance(bundle.text_encoder, (SD3TextEncoder, FluxTextEncoder)):
        raise SampleConfigError(f"t5=false: this model's text encoder ({type(bundle.text_encoder).__name__}) has no "
                                "T5; the option is for SD3 and FLUX.1 models")
    bundle.text_encoder.drop_t5()


OUTPUT_NAME = re.compile(r"(\d{5}|grid)\.png")  # what sample() writes: 00000.png, ... and grid.png


def earlier_outputs(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if OUTPUT_NAME.fullmatch(p.name)) if out_dir.is_dir() else []


def prepare_out_dir(cfg: DictConfig) -> tuple[Path, list[Path]]:
    """Before the model loads: out_dir must not hold an earlier run's images (unless overwrite=true: they are
    returned, to be removed before the first new one is written, so old and new never mix) and must be
    writable (created here, then probed with a file)."""
    out_dir = Path(cfg.out_dir)
    earlier = earlier_outputs(out_dir)
    if earlier and not cfg.overwrite:
        names = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise SampleConfigError(f"out_dir {out_dir} already holds {len(earlier)} image(s) of an earlier run "
                                f"({names}): choose another out_dir, or set overwrite=true to replace them")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise SampleConfigError(f"out_dir {out_dir} is not writable ({err.strerror or err}): choose another "
                                "out_dir") from err
    return out_dir, earlier


# --------------------------------------------------------------------------------------------------------------
# the run


def sample(cfg: Any) -> list[Path]:
    """Generate ``n_images`` per prompt into ``out_dir``; returns the image paths (and grid.png last)."""
    cfg = typed_config(cfg)
    check_options(cfg)
    prompts = read_prompts(cfg)
    init, mask = read_images(cfg)
    sized = [p for p in prompts if p.width is not None or p.height is not None]
    if init is not None and sized:
        raise SampleConfigError(f"prompt_file: {sized[0].where}: --w/--h cannot be used with init_image (the "
                                "images take its size)")
    specs = read_control_specs(cfg)
    out_dir, earlier = prepare_out_dir(cfg)
    bundle = _load_model(cfg)
    controls = _load_controls(specs, bundle)
    runs = [(p, prompt_config(cfg, p)) for p in prompts]  # each prompt with its line's settings in cfg
    sizes = {}
    for p, run in runs:
        key = _settings_key(p)
        if key not in sizes:
            sizes[key] = _check_run(run, bundle, init, mask, len(prompts), p.where if p.has_settings() else "")
    for p in earlier:  # overwrite=true, and the model is ready: the earlier run's images go, all of them
        p.unlink(missing_ok=True)
    return _write_images(cfg, bundle, runs, sizes, init, mask, out_dir, controls)


def _load_controls(specs, bundle):
    from ldm.formats.safe_load import CheckpointError
    from ldm.pipelines.control_options import ControlOptionError, load_controls

    try:
        return load_controls(specs, bundle, lambda path: _open_image(path, "control_image"))
    except (ControlOptionError, CheckpointError) as err:
        raise SampleConfigError(f"controlnet: {err}") from err


def _load_model(cfg: DictConfig):
    """The model of ``ckpt`` with the LoRA files, embeddings and long-prompt setting asked for."""
    bundle = load_bundle(cfg.ckpt, use_ema=cfg.use_ema, device=cfg.device, dtype=cfg.dtype,
                         text_encoder=cfg.text_encoder, prediction_type=cfg.prediction_type)
    if cfg.max_chunks is not None:
        set_max_chunks(bundle, cfg.max_chunks)
    if not cfg.t5:
        skip_t5(bundle)
    if cfg.lora:
        from ldm.formats.lora_files import LoRAFileError, apply_lora_files, bundle_roots

        try:
            apply_lora_files(bundle_roots(bundle), list(cfg.lora), report=print)
        except LoRAFileError as err:
            raise SampleConfigError(f"lora: {err}") from err
    if cfg.embeddings:  # the prompt uses each file's token (its key, its file stem, or FILE:TOKEN)
        from ldm.formats.embeddings import load_embedding_files
        from ldm.formats.safe_load import CheckpointError

        try:
            load_embedding_files(bundle.text_encoder, list(cfg.embeddings), report=print)
        except (CheckpointError, FileNotFoundError) as err:
            raise SampleConfigError(f"embeddings: {err}") from err
    return bundle


def _settings_key(prompt: SamplePrompt) -> tuple:
    """What a prompt's line sets (images of prompts with equal settings may share a batch)."""
    return dataclasses.astuple(dataclasses.replace(prompt, prompt="", where=""))


def prompt_config(cfg: DictConfig, prompt: SamplePrompt) -> DictConfig:
    """``cfg`` with the settings a prompt file's line gives (--n --w --h --d --l --s --ss) in place of its own."""
    if not prompt.has_settings():
        return cfg
    changes: dict[str, Any] = {key: value for key, value in (
        ("negative_prompt", prompt.negative_prompt), ("width", prompt.width), ("height", prompt.height),
        ("seed", prompt.seed), ("guidance_scale", prompt.guidance_scale)) if value is not None}
    if prompt.sampler is not None or prompt.steps is not None:
        changes["sampler"] = dataclasses.asdict(sampler_for(prompt, SamplingOptions.of(cfg.sampler)))
    return OmegaConf.merge(cfg, changes)


def _check_run(cfg: DictConfig, bundle, init, mask, n_prompts: int, where: str) -> tuple[int, int]:
    """The (height, width) of a run's images, after the checks that need the model: its size, memory and steps.
    ``where``: the prompt file line whose settings ``cfg`` holds ('' for the options alone)."""
    said = f"prompt_file: {where}: " if where else ""
    if init is not None:
        width, height = init.size
    else:
        height, width = cfg.height or default_size(bundle), cfg.width or default_size(bundle)
    try:
        check_size(bundle, height, width)
    except ValueError as err:
        raise SampleConfigError(f"{said}height/width{' (of init_image)' if init is not None else ''}: {err}") from err
    if cfg.check_memory:
        from ldm.pipelines.memory import check_fits

        try:
            check_fits(bundle, min(cfg.batch_size, n_prompts * cfg.n_images), height, width,
                       guidance=cfg.guidance_scale != 1.0, trained_at=bundle.meta.get("resolution"))
        except MemoryError as err:
            raise SampleConfigError(f"{said}{err}") from None
    if unet_kind(bundle) == "inpaint" and mask is None:
        raise SampleConfigError(f"{cfg.ckpt} is an inpainting model (9-channel U-Net): give init_image=... and "
                                "mask=...")
    if cfg.sampler.steps > bundle.schedule.num_train_timesteps:
        raise SampleConfigError(f"{said}sampler.steps must be <= {bundle.schedule.num_train_timesteps} (the "
                                f"model's training timesteps), got {cfg.sampler.steps}")
    try:
        SamplingOptions.of(cfg.sampler).timesteps(bundle.schedule)  # steps_offset past the last timestep
    except ValueError as err:
        raise SampleConfigError(f"{said}sampler: {err}") from err
    return height, width


def _write_images(cfg: DictConfig, bundle, runs: list, sizes: dict, init, mask, out_dir: Path,
                  controls: list = ()) -> list[Path]:
    """``n_images`` of each prompt, in batches of up to ``batch_size`` images of prompts with equal settings:
    batch j is seeded with seed + (index of its first image), a prompt's own --d + (its index among the prompt's
    images); each PNG records what made it. Then grid.png of them all."""
    jobs = [(p, run, k) for p, run in runs for k in range(cfg.n_images)]
    paths, images, start = [], [], 0
    while start < len(jobs):
        key = _settings_key(jobs[start][0])
        stop = start + 1
        while stop < min(len(jobs), start + cfg.batch_size) and _settings_key(jobs[stop][0]) == key:
            stop += 1
        first, run, k = jobs[start]
        batch = [p.prompt for p, _, _ in jobs[start:stop]]
        seed = first.seed + k if first.seed is not None else cfg.seed + start
        height, width = sizes[key]
        out = _generate(run, bundle, batch, seed, init, mask, height, width, controls)
        base = _base_params(run, bundle, height, width, init is not None, mask is not None)
        for j, (prompt, pil) in enumerate(zip(batch, to_pil(out))):
            params = {"prompt": prompt, **base, "seed": seed, "batch_size": len(batch), "batch_pos": j}
            paths.append(save_png(pil, out_dir / f"{start + j:05d}.png", params))
        images.append(out.cpu())
        start = stop
    if cfg.grid:
        one_size = len({tuple(im.shape[-2:]) for im in images}) == 1
        grid = (to_pil(make_grid(torch.cat(images)))[0] if one_size  # prompts of several sizes: each in its cell
                else labelled_grid([pil for batch in images for pil in to_pil(batch)]))
        params = {"prompt": " | ".join(dict.fromkeys(p.prompt for p, _ in runs)),
                  **_base_params(cfg, bundle, *sizes[_settings_key(runs[0][0])], init is not None, mask is not None),
                  "seed": cfg.seed, "batch_size": cfg.batch_size, "n_images": len(jobs)}
        paths.append(save_png(grid, out_dir / "grid.png", params))
    return paths


def _base_params(cfg: DictConfig, bundle, height: int, width: int, img2img: bool, inpainting: bool) -> dict:
    """What produced the images (recorded in every PNG); no paths of the run itself, no times. PNGs are shared:
    the files they name are written as shareable names (``ldm.formats.shared_names``: relative to out_dir, a hub
    id or relative path as given, else the file name), never the user's home or an absolute path."""
    sampling = SamplingOptions.of(cfg.sampler).record()  # steps, sampler, spacing and what applies to the sampler

    def name(path) -> str:
        return shared_name(path, cfg.out_dir)

    params: dict[str, Any] = {
        "negative_prompt": cfg.negative_prompt, "steps": sampling.pop("steps"), "sampler": sampling.pop("sampler"),
        "cfg_scale": cfg.guidance_scale, "size": f"{width}x{height}", "model": name(cfg.ckpt),
        "prediction_type": bundle.schedule.prediction_type, **sampling,
        "use_ema": cfg.use_ema, "dtype": str(next(bundle.unet.parameters()).dtype).removeprefix("torch."),
    }
    if not cfg.t5:
        params["t5"] = False
    if cfg.lora:
        params["lora"] = [name(spec) for spec in cfg.lora]  # FILE[:SCALE]: the scale stays with the file name
    if cfg.embeddings:
        params["embeddings"] = [name(spec) for spec in cfg.embeddings]
    if cfg.controlnet:
        from ldm.pipelines.control_options import control_specs

        specs = control_specs(cfg.controlnet, cfg.control_image, cfg.control_scale, cfg.control_start,
                              cfg.control_end)
        params["controlnet"] = [f"{name(c.path)}:{c.scale}:{c.start}-{c.end}" for c in specs]
        params["control_image"] = [name(c.image) for c in specs]
    if img2img:
        params.update(init_image=name(cfg.init_image), strength=_strength(cfg, inpainting))
    if inpainting:
        params.update(mask=name(cfg.mask), feather=cfg.feather)
    return {k: v for k, v in params.items() if v is not None}


def _strength(cfg: DictConfig, inpainting: bool) -> float:
    if cfg.strength is not None:
        return cfg.strength
    return INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH


def _generate(cfg: DictConfig, bundle, prompts: list[str], seed: int, init, mask, height: int, width: int,
              controls: list = ()):
    from ldm.pipelines import image_to_image, inpaint, text_to_image
    from ldm.pipelines.control_options import controls_at

    common = dict(negative_prompt=cfg.negative_prompt or None, sampler=SamplingOptions.of(cfg.sampler),
                  guidance_scale=cfg.guidance_scale, seed=seed, control=controls_at(controls, height, width))
    if mask is not None:
        return inpaint(bundle, pil_to_tensor(init), mask_batch(mask), prompts, strength=_strength(cfg, True),
                       feather=cfg.feather, **common)
    if init is not None:
        return image_to_image(bundle, pil_to_tensor(init), prompts, strength=_strength(cfg, False), **common)
    return text_to_image(bundle, prompts, height=height, width=width, **common)
