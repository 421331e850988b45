"""Does an export sample like the model it was made from? (``python -m ldm.export ... --verify``)

After an export is written, each consumer reloads it the way it would: our own loader (``load_bundle``) always;
diffusers' ``from_pretrained`` (a diffusers folder) or ``from_single_file`` (a single file with its yaml) and, for
``--merge-lora`` files, ``load_lora_weights`` on the unmerged base, when diffusers is installed. Each draws the same
seeded samples (the export's training resolution, DDIM with the export's inference settings (flow-Euler for SD3 and
Flux: StableDiffusion3Pipeline's / FluxPipeline's sampler), the same noise) and is compared with ldm's samples of
the model that was exported (the EMA U-Net if that was exported, LoRA merged).

Everything runs in float32 (TF32 off): the check measures what the export's files hold, not a runtime's precision.
Nothing is downloaded: diffusers reads local files only, and a single file's tokenizer, text-encoder config and
scheduler (which the file cannot carry) come from a diffusers folder written from the source into a temporary
folder, as one passes ``config=<base model folder>`` to ``from_single_file``.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ldm.formats.common import ExportError
from ldm.diffusion.flow import FlowMatching
from ldm.formats.diffusers_folder import diffusers_scheduler_config
from ldm.formats.exporter import ExportResult, is_flux, is_sd3, pipeline_name, write_diffusers_folder
from ldm.formats.load import load_bundle, resolve_device
from ldm.models.bundle import ModelBundle
from ldm.pipelines.sampling_options import SamplingOptions
from ldm.pipelines.text_to_image import text_to_image

DEFAULT_PROMPTS = ("a red circle on a white background", "a photo of a dog in the snow")


@dataclass(frozen=True)
class Tolerance:
    """The largest difference an export may make. Images in [0, 1]; max_abs is one pixel channel's worst
    difference, min_psnr is over all pixels of all samples."""
    max_abs: float
    min_psnr: float

    def __str__(self) -> str:
        return f"max |diff| <= {self.max_abs:.3g} ({self.max_abs * 255:.3g}/255), PSNR >= {self.min_psnr:g} dB"


# Measured (DDIM 10 steps, guidance 3, 2 prompts): fp32 exports differ by ~1e-6 (diffusers' layers and DDIM are
# other code over the same numbers); fp16 weights move a tiny trained model's 32 px samples by 0.16/255 at most
# (79 dB), bf16 by 5/255 (52 dB); a changed weight, VAE scaling factor or prediction type by 170-210/255 (10-15
# dB). The fp16 / bf16 bounds leave room for a large model's deeper sums and 512 px images (more pixels, a larger
# worst one) and stay far from a tampered export.
TOLERANCES = {"fp32": Tolerance(2 / 255, 60.0), "fp16": Tolerance(16 / 255, 40.0), "bf16": Tolerance(48 / 255, 30.0)}


@dataclass
class VerifySettings:
    prompts: Sequence[str] = DEFAULT_PROMPTS
    steps: int = 10
    guidance: float = 3.0
    seed: int = 0
    device: str = "auto"  # CUDA when available, else CPU

    def torch_device(self) -> torch.device:
        """The device to sample on; ValueError for one that does not exist here (checked before the export)."""
        try:
            device = resolve_device(self.device)
        except RuntimeError as err:
            raise ValueError(f"--verify-device {self.device!r}: {err}") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--verify-device {self.device!r}: CUDA is not available on this machine")
        if not self.prompts or int(self.steps) < 1:
            raise ValueError("--verify needs at least one prompt and one step")
        return device


@dataclass
class Comparison:
    """One consumer's samples against the reference; ``problem``: it could not load / run the export;
    ``skipped``: it was not run, and why."""
    consumer: str
    how: str = ""
    max_abs: float = math.nan
    mean_abs: float = math.nan
    psnr: float = math.nan
    problem: str | None = None
    skipped: str | None = None

    def ok(self, tol: Tolerance) -> bool:
        return self.skipped is not None or (self.problem is None and self.max_abs <= tol.max_abs
                                            and self.psnr >= tol.min_psnr)

    def line(self, tol: Tolerance) -> str:
        if self.skipped is not None:
            return f"  {self.consumer:<28} skipped: {self.skipped}"
        if self.problem is not None:
            return f"  {self.consumer:<28} FAILED: {self.problem}"
        verdict = "ok" if self.ok(tol) else "DIFFERS"
        return (f"  {self.consumer:<28} max |diff| {self.max_abs:.2e} ({self.max_abs * 255:.2f}/255)  mean "
                f"{self.mean_abs:.2e}  PSNR {self.psnr:6.1f} dB  {verdict}")

    def text(self, tol: Tolerance) -> str:
        """The result line, and how the consumer loaded the export on a second line."""
        if self.how and self.skipped is None and self.problem is None:
            return f"{self.line(tol)}\n  {'':<28} ({self.how})"
        return self.line(tol)

    def why(self, tol: Tolerance) -> str:
        if self.problem is not None:
            return f"{self.consumer}: {self.problem}"
        return (f"{self.consumer} differs from ldm's samples of the source: max |diff| {self.max_abs:.3g} "
                f"(tolerance {tol.max_abs:.3g}), PSNR {self.psnr:.1f} dB (tolerance {tol.min_psnr:g} dB)")


@dataclass
class VerifyReport:
    header: str
    tolerance: Tolerance
    dtype: str
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok(self.tolerance) for c in self.comparisons)

    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.ok(self.tolerance)]

    def verdict(self) -> str:
        if self.passed:
            return f"verify: passed ({self.dtype} tolerance: {self.tolerance})"
        return "\n".join(f"verify: FAILED: {c.why(self.tolerance)}" for c in self.failures())

    def summary(self) -> str:
        return "\n".join([self.header, *(c.text(self.tolerance) for c in self.comparisons), self.verdict()])


def compare(reference: Tensor, images: Tensor) -> tuple[float, float, float]:
    """max |diff|, mean |diff| and PSNR (10 log10(1 / MSE), dB) of two image batches in [0, 1]."""
    if images.shape != reference.shape:
        raise ValueError(f"samples of shape {tuple(images.shape)}, expected {tuple(reference.shape)}")
    diff = (images.float().cpu() - reference.float().cpu()).abs()
    mse = float((diff ** 2).mean())
    return float(diff.max()), float(diff.mean()), 10 * math.log10(1.0 / mse) if mse > 0 else math.inf


# ----------------------------------------------------------------------------------------------------------------
# sampling: ldm's pipeline and diffusers' with the same prompts, sizes, steps, guidance and noise


def sampler_options(reference: ModelBundle, steps: int) -> SamplingOptions:
    """DDIM with the inference settings of the scheduler config an export writes (``diffusers_scheduler_config``):
    SD's leading spacing with offset 1 (trailing for zero terminal SNR), the last step to abar_0. A flow-matching
    model (SD3, Flux): flow-Euler over its schedule's sigmas, as StableDiffusion3Pipeline / FluxPipeline step."""
    if isinstance(reference.schedule, FlowMatching):
        return SamplingOptions("flow_euler", int(steps)).check()
    try:
        cfg = diffusers_scheduler_config(reference.schedule)
    except ExportError:  # a schedule only our bundle can hold: SD's inference settings
        cfg = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}
    spacing = cfg["timestep_spacing"]
    return SamplingOptions("ddim", int(steps), spacing=spacing, final_alpha_one=bool(cfg["set_alpha_to_one"]),
                           steps_offset=int(cfg["steps_offset"]) if spacing == "leading" else 0).check()


def ldm_samples(bundle: ModelBundle, settings: VerifySettings, options: SamplingOptions, size: int) -> Tensor:
    images = text_to_image(bundle, list(settings.prompts), sampler=options, guidance_scale=settings.guidance,
                           height=size, width=size, seed=settings.seed)
    return (images.float().cpu() + 1) / 2


def diffusers_samples(pipe, settings: VerifySettings, size: int, **options) -> Tensor:
    """The pipeline's own call: its scheduler as loaded, its empty-prompt (SDXL: zero) unconditional branch and
    the initial noise from a CPU generator seeded like ours (``text_to_image`` draws the same latents). options:
    more of the pipeline's arguments (SD3 / Flux: max_sequence_length)."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(list(settings.prompts), guidance_scale=settings.guidance, num_inference_steps=settings.steps,
               height=size, width=size, generator=torch.Generator().manual_seed(settings.seed), output_type="pt",
               **options)
    return out.images.float().cpu()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' loading bars and warnings off while the consumers load (errors still show):
    the report lines are what the user reads."""
    import importlib
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [log.level for log in loggers]
    bars = []
    for name in ("diffusers", "transformers"):
        try:
            utils = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        bars.append((utils, utils.is_progress_bar_enabled()))
        utils.disable_progress_bar()
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # e.g. torch_dtype -> dtype: we support older diffusers
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
        for utils, enabled in bars:
            if enabled:
                utils.enable_progress_bar()


@contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 on CUDA while comparing: its 10-bit mantissa would hide an fp16 export's rounding in its own."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------------------
# the consumers


@dataclass
class Context:
    """What the consumers share: the export, the model it was made from, the settings and a temporary folder."""
    result: ExportResult
    reference: ModelBundle
    base: ModelBundle | None
    merge_lora: Sequence[str]
    settings: VerifySettings
    options: SamplingOptions
    device: torch.device
    tmp: Path

    @property
    def transformer(self) -> bool:
        """SD3's MMDiT or a Flux: their own pipelines, text encoders (with a T5) and folder layouts."""
        return is_sd3(self.reference) or is_flux(self.reference)

    @property
    def sdxl(self) -> bool:
        return hasattr(self.reference.text_encoder, "model_2") and not self.transformer

    @property
    def t5_length(self) -> int | None:
        """The source's T5 tokens per prompt (SD3 / Flux with a T5): the pipelines' max_sequence_length."""
        te = self.reference.text_encoder
        return te.t5_length if self.transformer and getattr(te, "t5", None) is not None else None

    def call_options(self) -> dict:
        return {} if self.t5_length is None else {"max_sequence_length": self.t5_length}

    @property
    def size(self) -> int:
        return int(self.result.resolution)

    def companion(self) -> Path:
        """A diffusers folder of the source: what a single file lacks (tokenizers, text-encoder configs, the
        scheduler), as ``config=`` of ``from_single_file`` and ``text_encoder=`` of ``load_bundle``."""
        folder = self.tmp / "source-config"
        if not folder.exists():
            write_diffusers_folder(self.reference, folder, resolution=self.size)
        return folder

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, pipeline_name(self.reference))

    def pipeline_kwargs(self) -> dict:
        if self.transformer:  # no T5: the folder's model_index names none, and the pipeline is told so
            t5 = "text_encoder_2" if is_flux(self.reference) else "text_encoder_3"
            extra = {} if self.t5_length is not None else {t5: None, t5.replace("text_encoder", "tokenizer"): None}
        else:
            extra = {"add_watermarker": False} if self.sdxl else {"safety_checker": None}
        return {"torch_dtype": torch.float32, "local_files_only": True, **extra}


def ours(ctx: Context) -> tuple[Tensor, str]:
    path = ctx.result.paths[0]
    single = ctx.result.format == "single-file"
    bundle = load_bundle(path, device=ctx.device, dtype="float32", text_encoder=ctx.companion() if single else None)
    how = "tokenizer from the source; every weight from the file" if single else ""
    if ctx.t5_length is not None and bundle.text_encoder.t5_length != ctx.t5_length:
        bundle.text_encoder.t5_length = ctx.t5_length  # a folder cannot record it: as max_sequence_length below
        how = ", ".join(filter(None, [how, f"T5 length {ctx.t5_length} as the source's"]))
    return ldm_samples(bundle, ctx.settings, ctx.options, ctx.size), how


def from_pretrained(ctx: Context) -> tuple[Tensor, str]:
    cls = ctx.pipeline_class()
    pipe = cls.from_pretrained(ctx.result.paths[0], **ctx.pipeline_kwargs()).to(ctx.device)
    how = f"{cls.__name__}, scheduler {type(pipe.scheduler).__name__}"
    how += f", max_sequence_length={ctx.t5_length}" if ctx.t5_length is not None else ""
    return diffusers_samples(pipe, ctx.settings, ctx.size, **ctx.call_options()), how


def from_single_file(ctx: Context) -> tuple[Tensor, str]:
    """SD 1/2: U-Net and VAE configs from the yaml we wrote (``original_config``), as ComfyUI / A1111 read it.
    SDXL (and SD3, which has no yaml): diffusers' yaml reader knows only SDXL base's sizes, so every config comes
    from ``config=``."""
    cls = ctx.pipeline_class()
    path = ctx.result.paths[0]
    by_config = ctx.sdxl or ctx.transformer
    kwargs = {} if by_config else {"original_config": str(ctx.result.paths[1])}
    pipe = cls.from_single_file(str(path), config=str(ctx.companion()), **kwargs, **ctx.pipeline_kwargs())
    pipe.to(ctx.device)
    for part in pipe.components.values():  # diffusers 0.42's from_single_file leaves SD3's T5 in train mode (dropout)
        if isinstance(part, torch.nn.Module):
            part.eval()
    configs = ("configs from the source's diffusers folder" if by_config
               else f"U-Net/VAE configs from {ctx.result.paths[1].name}")
    return (diffusers_samples(pipe, ctx.settings, ctx.size, **ctx.call_options()),
            f"{cls.__name__}, {configs}; weights from the file")


def load_lora_weights(ctx: Context) -> tuple[Tensor, str]:
    """The unmerged model in diffusers with each --merge-lora file loaded at its scale: the files themselves,
    applied at run time by diffusers, against ldm's merge of them."""
    from ldm.formats.lora_files import parse_lora_spec, resolve

    base = ctx.tmp / "unmerged-base"
    write_diffusers_folder(ctx.base, base, resolution=ctx.size)
    pipe = ctx.pipeline_class().from_pretrained(base, **ctx.pipeline_kwargs())
    names, scales = [], []
    for i, spec in enumerate(ctx.merge_lora):
        file, scale = parse_lora_spec(spec)
        path = resolve(file)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"lora{i}")
        names.append(f"lora{i}")
        scales.append(scale)
    pipe.set_adapters(names, adapter_weights=scales)
    pipe.to(ctx.device)
    return (diffusers_samples(pipe, ctx.settings, ctx.size, **ctx.call_options()),
            f"{len(names)} file(s) on the unmerged model")


@dataclass
class Consumer:
    name: str
    run: Callable[[Context], tuple[Tensor, str]]
    needs: tuple[str, ...] = ()  # packages it imports
    skip: str | None = None  # why it cannot run here


def consumers_for(result: ExportResult, merge_lora: Sequence[str], have_base: bool = True) -> list[Consumer]:
    found = [Consumer("ldm load_bundle", ours)]
    if result.format == "diffusers":
        model = result.model
        no_t5 = (model is not None and is_flux(model) and getattr(model.text_encoder, "t5", None) is None
                 and "FluxPipeline encodes a prompt with its T5 (text_encoder_2); this export has none")
        found.append(Consumer("diffusers from_pretrained", from_pretrained, ("diffusers", "transformers"),
                              no_t5 or None))
    elif result.format == "single-file":
        found.append(Consumer("diffusers from_single_file", from_single_file, ("diffusers", "transformers")))
    if merge_lora:
        skip = None if have_base else "the unmerged model was not given (verify_export(base=...))"
        found.append(Consumer("diffusers load_lora_weights", load_lora_weights, ("diffusers", "transformers", "peft"),
                              skip or not_for_diffusers(merge_lora)))
    return found


def not_for_diffusers(merge_lora: Sequence[str]) -> str | None:
    """Why diffusers' load_lora_weights cannot stand for ldm's merge of these files: it loads LoRA and DoRA, not
    LyCORIS's LoHa / LoKr, and scales a DoRA's dW inside the norm (PEFT's adapter weight) where ldm and ComfyUI
    scale the change W' - W, so a DoRA compares only at scale 1."""
    from ldm.formats.lora_files import file_kinds, parse_lora_spec

    for spec in merge_lora:
        file, scale = parse_lora_spec(spec)
        kinds = file_kinds(file)
        if kinds - {"lora", "dora"}:
            return f"{file} holds {'/'.join(sorted(kinds - {'lora', 'dora'}))} (diffusers loads LoRA and DoRA only)"
        if "dora" in kinds and scale != 1.0:
            return f"{file} is a DoRA at scale {scale:g} (diffusers scales DoRA differently; compared at scale 1)"
    return None


def missing_packages(names: Sequence[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def run_consumer(consumer: Consumer, ctx: Context, reference: Tensor) -> Comparison:
    missing = missing_packages(consumer.needs)
    if missing:
        names = " ".join(missing)
        return Comparison(consumer.name, skipped=f"{', '.join(missing)} not installed (pip install {names})")
    if consumer.skip is not None:
        return Comparison(consumer.name, skipped=consumer.skip)
    try:
        images, how = consumer.run(ctx)
        if not torch.isfinite(images).all():
            return Comparison(consumer.name, how, problem="its samples hold NaN or infinite values")
        return Comparison(consumer.name, how, *compare(reference, images))
    except Exception as err:  # noqa: BLE001 - a consumer that cannot read the export is the finding to report
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return Comparison(consumer.name, problem=f"could not load or sample it: {type(err).__name__}: {text[:300]}")
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def verify_export(result: ExportResult, *, base: ModelBundle | None = None, merge_lora: Sequence[str] = (),
                  settings: VerifySettings | None = None, log: Callable[[str], None] | None = None) -> VerifyReport:
    """Reload ``result`` (what ``export`` returned) in each consumer and compare its samples with ldm's samples of
    ``result.model`` (the model that was written, before the dtype cast), which is moved to the device in float32.
    ``base``: the model before ``merge_lora`` was merged (for ``load_lora_weights``)."""
    settings = settings or VerifySettings()
    if result.model is None:
        raise ValueError("verify_export needs the ExportResult of export() (its model)")
    if not result.frozen:
        raise ExportError("--verify needs the VAE and text encoder in the export; it cannot check a --no-frozen one")
    device = settings.torch_device()
    reference = result.model.to(device, torch.float32).eval()
    options = sampler_options(reference, settings.steps)
    tolerance = TOLERANCES[result.dtype]
    lora = f", {len(merge_lora)} LoRA file(s) merged" if merge_lora else ""
    sampler = (f"flow-Euler {options.steps} steps" if options.name == "flow_euler"
               else f"DDIM {options.steps} steps ({options.spacing})")
    header = (f"verify: {len(settings.prompts)} prompts at {result.resolution}x{result.resolution}, {sampler}"
              f", guidance {settings.guidance:g}, seed {settings.seed}, "
              f"float32 on {device.type}\n  reference: ldm's samples of the source model (U-Net weights: "
              f"{result.unet_weights}{lora})")
    report = VerifyReport(header, tolerance, result.dtype)
    log = log or (lambda line: None)
    log(header)
    with exact_float32(), quiet_libraries(), tempfile.TemporaryDirectory(prefix="ldm-verify-") as tmp:
        expected = ldm_samples(reference, settings, options, result.resolution)
        ctx = Context(result, reference, base, list(merge_lora), settings, options, device, Path(tmp))
        for consumer in consumers_for(result, merge_lora, base is not None):
            report.comparisons.append(run_consumer(consumer, ctx, expected))
            log(report.comparisons[-1].text(tolerance))
    return report
