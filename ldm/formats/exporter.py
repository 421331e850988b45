"""``export(source, format, out)``: load a model, check it fits the format, write it under a temporary name in the
output's folder and rename it into place at the end.

Nothing is written before the source has loaded and passed the format's checks, and an existing output is only
replaced with ``force`` (and then only if it is a file, or a folder that one of our exports wrote).
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ldm.models.bundle import ModelBundle
from ldm.diffusion.flow import FlowMatching
from ldm.formats.common import ExportError, check_schedule
from ldm.formats.comfyui_check import ComfyCheck, comfyui_check_bundle
from ldm.formats.dtypes import DTYPES as ALL_DTYPES
from ldm.formats.diffusers_folder import check_diffusers, write_diffusers
from ldm.formats.ldm_bundle import write_ldm_bundle
from ldm.formats.flux_folder import T5_LENGTH as FLUX_T5_LENGTH, check_flux, write_flux_diffusers
from ldm.formats.load import load_bundle
from ldm.formats.safe_load import CheckpointError
from ldm.formats.sd3_folder import check_sd3, write_sd3_diffusers
from ldm.formats.sd3_single_file import write_sd3_single_file
from ldm.formats.single_file import check_single_file, write_single_file

FORMATS = ("diffusers", "single-file", "ldm")
DTYPES = {name: ALL_DTYPES[name] for name in ("fp32", "fp16", "bf16")}  # the names --dtype accepts
DEFAULT_RESOLUTION = 512  # SD's, when the source does not record its training resolution
# Files that mark a folder as an export this tool may replace with --force.
EXPORT_MARKERS = ("model_index.json", "ldm_bundle.json")


@dataclass
class ExportResult:
    format: str
    paths: list[Path]  # what was written (single-file: the .safetensors and its .yaml)
    written: list[str]  # the entries inside (folders) or the file names
    dtype: str
    unet_weights: str  # "EMA", "raw" ...
    frozen: bool
    resolution: int
    notes: list[str] = field(default_factory=list)
    model: ModelBundle | None = field(default=None, repr=False, compare=False)  # what was written, before the cast

    def summary(self) -> str:
        lines = [f"exported {self.format} ({self.dtype}) -> {self.paths[0]}"]
        lines += [f"  also: {p}" for p in self.paths[1:]]
        lines.append(f"  U-Net weights: {self.unet_weights}")
        lines.append(f"  contents: {', '.join(self.written)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# input


def load_source(source, *, use_ema: bool = True, text_encoder: Any = None) -> ModelBundle:
    """Our training checkpoint, or anything ``ldm.formats.load.load_bundle`` reads, as a CPU bundle in eval mode."""
    try:
        return load_bundle(source, use_ema=use_ema, device="cpu", text_encoder=text_encoder)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise ExportError(f"cannot read {source}: {err}") from err


def _unet_weights(bundle: ModelBundle, use_ema: bool) -> str:
    ema = bundle.meta.get("ema")
    if not use_ema:
        return "raw (--raw)"
    if ema:
        return "EMA"
    if ema is False:
        return "raw: the source has no EMA weights"
    return "as stored in the source"


def resolution_of(bundle: ModelBundle) -> int | None:
    res = bundle.meta.get("resolution")
    if res is None and isinstance(bundle.meta.get("model_config"), dict):
        res = bundle.meta["model_config"].get("resolution")
    return int(res) if res else None


# ----------------------------------------------------------------------------------------------------------------
# output paths, overwrite rules, atomic staging


def output_paths(fmt: str, out: Path) -> list[Path]:
    """The paths an export writes: a folder, or the single file and its yaml."""
    if fmt == "single-file":
        if out.suffix.lower() != ".safetensors":
            raise ExportError(f"--out for single-file must end with .safetensors (got {out.name}); the original "
                              "config is written next to it with the same name and .yaml")
        return [out, out.with_suffix(".yaml")]
    return [out]


def check_overwrite(paths: list[Path], is_folder: bool, force: bool) -> None:
    for path in paths:
        if not path.exists() and not path.is_symlink():
            continue
        if not force:
            raise ExportError(f"{path} already exists; pass --force to replace it")
        if path.is_dir() and not path.is_symlink():
            if not is_folder:
                raise ExportError(f"{path} is a folder; --force only replaces files here (remove it yourself)")
            if any(path.iterdir()) and not any((path / m).is_file() for m in EXPORT_MARKERS):
                raise ExportError(f"{path} is a folder that no export wrote (no {' / '.join(EXPORT_MARKERS)}); "
                                  "--force does not delete it: choose another --out or remove it yourself")
        elif is_folder:
            raise ExportError(f"{path} is a file; --force only replaces export folders here (remove it yourself)")


class Staging:
    """Temporary siblings of the final paths; ``commit`` renames them into place, ``abort`` removes them."""

    def __init__(self, finals: list[Path]):
        self.finals = finals
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.temps = [p.parent / f".{p.name}.tmp-{tag}" for p in finals]

    def __enter__(self) -> "Staging":
        self.created: list[Path] = []  # parent folders made here (removed again on abort, if still empty)
        for final in self.finals:
            missing = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
            final.parent.mkdir(parents=True, exist_ok=True)
            self.created += missing
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def commit(self) -> None:
        for temp, final in zip(self.temps, self.finals):
            if final.is_dir() and not final.is_symlink():
                old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
                final.rename(old)
                temp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(temp, final)  # atomic for files (replaces an existing one)

    def abort(self) -> None:
        for temp in self.temps:
            if temp.is_dir() and not temp.is_symlink():
                shutil.rmtree(temp, ignore_errors=True)
            elif temp.exists():
                temp.unlink()
        for folder in self.created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------------------------
# export


def is_sd3(bundle: ModelBundle) -> bool:
    """An MMDiT model (SD3 / SD3.5 or our own): written in SD3's layouts (sd3_folder, sd3_single_file)."""
    return hasattr(bundle.unet, "joint_blocks")


def is_flux(bundle: ModelBundle) -> bool:
    """A Flux model (FLUX.1 or our own): written as a FluxPipeline folder (flux_folder)."""
    from ldm.models.flux import Flux

    return isinstance(bundle.unet, Flux)


def _check_format(bundle: ModelBundle, fmt: str) -> None:
    if fmt == "single-file" and is_flux(bundle):
        raise ExportError("a Flux model is exported as a FLUX.1 diffusers folder (--format diffusers) or an ldm "
                          "bundle; --format single-file writes SD / SDXL / SD3 files")
    if fmt == "diffusers" and is_flux(bundle):
        check_flux(bundle)
    elif fmt in ("diffusers", "single-file") and is_sd3(bundle):
        check_sd3(bundle)
    elif fmt == "diffusers":
        check_diffusers(bundle)
    elif fmt == "single-file":
        check_single_file(bundle)
    elif not isinstance(bundle.schedule, FlowMatching):  # the ldm bundle stores a flow schedule as it is
        check_schedule(bundle.schedule)


def export(source, fmt: str, out, *, raw: bool = False, dtype: str = "fp32", frozen: bool = True,
           force: bool = False, resolution: int | None = None, text_encoder: Any = None,
           log: Callable[[str], None] | None = None, merge_lora: Sequence[str] = (),
           allow_unloadable: bool = False) -> ExportResult:
    """Export ``source`` (a path any loader reads, or a ModelBundle) as ``fmt`` to ``out``.

    raw: the raw U-Net instead of the EMA weights. dtype: fp32 | fp16 | bf16 for the written floating tensors.
    frozen: False leaves out the VAE and the text encoder. resolution: the training image size (default: what
    the source records, else 512). text_encoder: for SD single-file sources, a folder with tokenizer/ +
    text_encoder/ (passed to ``load_bundle``). merge_lora: ``FILE[:SCALE]`` LoRA files baked into the weights.
    allow_unloadable: write a single file that ComfyUI cannot load as the model it is (``comfyui_check``: a
    non-SD size, another head count, schedule or latent scale); without it such a single file is refused.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if resolution is not None and resolution <= 0:
        raise ExportError(f"resolution must be positive, got {resolution}")
    out = Path(out).expanduser().absolute()
    finals = output_paths(fmt, out)
    is_folder = fmt != "single-file"
    check_overwrite(finals, is_folder, force)  # fails fast, before the (slow) load

    bundle = source if isinstance(source, ModelBundle) else load_source(source, use_ema=not raw,
                                                                       text_encoder=text_encoder)
    if merge_lora:
        import copy

        from ldm.formats.lora_files import LoRAFileError, apply_lora_files, bundle_roots

        if bundle is source:
            bundle = copy.deepcopy(bundle)  # the caller's model stays as it was

        try:
            apply_lora_files(bundle_roots(bundle), list(merge_lora), report=log or print)
        except LoRAFileError as err:
            raise ExportError(f"--merge-lora: {err}") from err
    _check_format(bundle, fmt)
    comfy = comfyui_check_bundle(bundle, frozen) if fmt == "single-file" else None
    if comfy is not None and not comfy.loadable and not allow_unloadable:
        raise ExportError(f"{comfy.verdict()}. A single file is for ComfyUI / A1111: export this model with "
                          "--format diffusers (or ldm), or pass --allow-unloadable to write the single file anyway "
                          "(ldm and diffusers' from_single_file with the yaml next to it read it)")
    notes = []
    res = resolution or resolution_of(bundle)
    if res is None:
        res = DEFAULT_RESOLUTION
        notes.append(f"the source does not record its training resolution: assumed {res} (set --resolution)")
    multiple = bundle.downsample_factor * bundle.unet.downsample_factor
    if res % multiple:
        raise ExportError(f"resolution {res} is not a multiple of {multiple} (VAE factor x U-Net downsampling)")
    torch_dtype = DTYPES[dtype]

    sd3, flux = is_sd3(bundle), is_flux(bundle)
    if sd3 and fmt == "single-file":
        finals = finals[:1]  # no original yaml: ComfyUI and diffusers read an SD3 file's sizes from its tensors
    check_overwrite(finals, is_folder, force)  # again: the load may have taken a while
    with Staging(finals) as stage:
        written = _write(bundle, fmt, stage.temps, finals, sd3, frozen=frozen, dtype=torch_dtype, resolution=res)
        stage.commit()

    notes.append(_no_frozen_note(fmt, out, comfy, bundle) if not frozen else _how_to_load(fmt, out, bundle, comfy))
    if (sd3 or flux) and fmt == "diffusers" and frozen and getattr(bundle.text_encoder, "t5", None) is None:
        n = "2" if flux else "3"
        notes.append(f"no T5 (text_encoder_{n} / tokenizer_{n} null in model_index.json, as diffusers saves such a "
                     f"pipeline): {pipeline_name(bundle)}.from_pretrained(out, text_encoder_{n}=None, "
                     f"tokenizer_{n}=None)")
    t5_length = getattr(bundle.text_encoder, "t5_length", None)
    if flux and fmt == "diffusers" and frozen and t5_length not in (None, FLUX_T5_LENGTH):
        notes.append(f"this model's prompts have {t5_length} T5 tokens, FluxPipeline's default {FLUX_T5_LENGTH}: "
                     f"sample with pipe(..., max_sequence_length={t5_length}) (ldm: "
                     f"load_flux_diffusers(out, t5_length={t5_length}))")
    notes += comfy.notes if comfy is not None else []
    result = ExportResult(fmt, finals, written, dtype, _unet_weights(bundle, not raw), frozen, res, notes, bundle)
    if log is not None:
        log(result.summary())
    return result


def write_diffusers_folder(bundle: ModelBundle, folder, **options) -> list[str]:
    """The model as the diffusers folder its pipeline loads (FluxPipeline, StableDiffusion3Pipeline, SD / SDXL's),
    written straight into ``folder`` (no staging: --verify's temporary folders)."""
    _check_format(bundle, "diffusers")
    return _write(bundle, "diffusers", [Path(folder)], [Path(folder)], is_sd3(bundle), **options)


def _write(bundle: ModelBundle, fmt: str, temps: list[Path], finals: list[Path], sd3: bool, **options) -> list[str]:
    """Write ``bundle`` as ``fmt`` into the staging paths ``temps`` -> the names written."""
    if fmt == "diffusers" and is_flux(bundle):
        return write_flux_diffusers(bundle, temps[0], **options)
    if sd3 and fmt == "diffusers":
        return write_sd3_diffusers(bundle, temps[0], **options)
    if sd3 and fmt == "single-file":
        write_sd3_single_file(bundle, temps[0], **options)
        return [finals[0].name]
    if fmt == "diffusers":
        return write_diffusers(bundle, temps[0], **options)
    if fmt == "single-file":
        write_single_file(bundle, temps[0], temps[1], **options)
        return [p.name for p in finals]
    return write_ldm_bundle(bundle, temps[0], **options)


def _comfy_words(comfy: ComfyCheck) -> str:
    return comfy.verdict() if comfy.loadable else f"--allow-unloadable: {comfy.verdict()}"


def _no_frozen_note(fmt: str, out: Path, comfy: ComfyCheck | None = None, bundle: ModelBundle | None = None) -> str:
    if fmt == "diffusers":
        pipeline = pipeline_name(bundle) if bundle is not None else "StableDiffusionPipeline"
        denoiser = "transformer/" if bundle is not None and (is_sd3(bundle) or is_flux(bundle)) else "unet/"
        return (f"--no-frozen: the VAE, text encoder and tokenizer are left out ({denoiser}, scheduler/ and "
                f"model_index.json only); pass them in: {pipeline}.from_pretrained(out, vae=..., "
                "text_encoder=..., tokenizer=...)")
    if fmt == "single-file":
        return ("--no-frozen: only the U-Net (model.diffusion_model.*) is in the file; load it as a U-Net / "
                "diffusion model and take the VAE and text encoder from the base model"
                + (f" ({_comfy_words(comfy)})" if comfy is not None else ""))
    return ("--no-frozen: only the U-Net weights are in the bundle; load it with "
            "ldm.formats.ldm_bundle.load_ldm_bundle_into(folder, unet, autoencoder=None, text_encoder=None)")


def pipeline_name(bundle: ModelBundle) -> str:
    """The diffusers pipeline class that loads this model's diffusers export."""
    if is_flux(bundle):
        return "FluxPipeline"
    if is_sd3(bundle):
        return "StableDiffusion3Pipeline"
    return "StableDiffusionXLPipeline" if hasattr(bundle.text_encoder, "model_2") else "StableDiffusionPipeline"


def _how_to_load(fmt: str, out: Path, bundle: ModelBundle, comfy: ComfyCheck | None = None) -> str:
    pipeline, sd3 = pipeline_name(bundle), is_sd3(bundle)
    if sd3 and fmt == "single-file":
        where = (f"{comfy.verdict()}: put {out.name} in models/checkpoints" if comfy is not None and comfy.loadable
                 else _comfy_words(comfy) if comfy is not None else "")
        return f"{where}; ldm: python sample.py ckpt={out} text_encoder=<an SD3 diffusers folder (its tokenizers)>"
    if fmt == "diffusers":
        return f"load with diffusers: {pipeline}.from_pretrained({str(out)!r})"
    if fmt == "single-file":
        yaml_name = out.with_suffix(".yaml").name
        diffusers = f"diffusers: {pipeline}.from_single_file({str(out)!r}, original_config=..., config=...)"
        if comfy is not None and not comfy.loadable:
            return f"{_comfy_words(comfy)}; read it with ldm or {diffusers} (the yaml {yaml_name} describes it)"
        return (f"{comfy.verdict() if comfy else 'ComfyUI'}: put {out.name} in models/checkpoints (it reads no "
                f"yaml); A1111: put {out.name} and {yaml_name} side by side in the checkpoints folder; {diffusers}")
    return f"sample with: python sample.py ckpt={out}"
