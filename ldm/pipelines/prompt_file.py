"""Sample-prompt files: one prompt per line, each with its own settings, in kohya sd-scripts' format.

    # comments and blank lines are skipped
    a red circle on a white background
    a blue square --n blurry, dark --w 512 --h 768 --d 42 --l 7 --s 30 --ss euler_a

A line is its prompt, then options, each introduced by `` --`` (a space and two dashes, as kohya splits a line)
and followed by a space and its value; letters are case-insensitive. A file with no options is a plain list of
prompts. kohya's ``.json`` (a list of such lines, or of objects with kohya's keys) and ``.toml`` (a ``[prompt]``
table of defaults with ``[[prompt.subset]]`` entries) forms are read too.

=========  ==================  ==================================================================================
option     .json/.toml key     what
=========  ==================  ==================================================================================
``--n``    negative_prompt     the negative prompt: everything up to the next option
``--w``    width               image width in pixels (a multiple of the model's downsampling, at most 4096)
``--h``    height              image height in pixels (likewise)
``--d``    seed                the seed of this prompt's image (a whole number >= 0)
``--l``    scale               classifier-free guidance scale (>= 0)
``--s``    sample_steps        sampler steps (1 to 1000)
``--ss``   sample_sampler      sampler: kohya's ddim, euler / k_euler, euler_a / k_euler_a, dpmsolver++ (DPM-Solver
                               ++(2M)), ddpm, or one of ours (ddim, ddpm, euler, euler_ancestral, dpmpp_2m)
=========  ==================  ==================================================================================

A setting a prompt does not give is the consumer's (the training callback's ``resolution``, ``sampler`` node,
``guidance_scale`` and ``seed``; sample.py's options). Where kohya ignores what it cannot read, this parser
refuses it, naming ``file:line``: an unknown or unsupported option (kohya's ``--cn`` ControlNet image, ``--am``
network multipliers, ``--g`` FLUX guidance, ...), a number that is not one or out of bounds, an option given
twice, a sampler we do not have. The file is bounded data: at most 1 MiB and 1,000 prompts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ldm.diffusion.samplers import SAMPLERS
from ldm.pipelines.sampling_options import ETA_SAMPLERS, FINAL_ALPHA_SAMPLERS, KARRAS_SAMPLERS, SamplingOptions

MAX_BYTES = 1 << 20
MAX_PROMPTS = 1000
MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1

# kohya's sampler names (library/train_util.get_my_scheduler) -> ours; the others have no sampler here
KOHYA_SAMPLERS = {"ddim": "ddim", "ddpm": "ddpm", "euler": "euler", "k_euler": "euler", "euler_a": "euler_ancestral",
                  "k_euler_a": "euler_ancestral", "dpmsolver++": "dpmpp_2m"}
KOHYA_ONLY_SAMPLERS = ("pndm", "lms", "k_lms", "heun", "dpm_2", "k_dpm_2", "dpm_2_a", "k_dpm_2_a", "dpmsolver",
                       "dpmsingle")
# kohya's other per-prompt options (train_util.line_to_prompt_dict, gen_img.py): named in the error, not guessed at
UNSUPPORTED_OPTIONS = {
    "g": "embedded guidance scale (FLUX)", "cn": "ControlNet image", "ctr": "CFG truncation ratio",
    "rcfg": "renormalised CFG", "fs": "flow shift", "am": "network (LoRA) multipliers",
    "ow": "SDXL original width", "oh": "SDXL original height", "nw": "SDXL negative original width",
    "nh": "SDXL negative original height", "ct": "SDXL crop top", "cl": "SDXL crop left", "nl": "negative scale",
    "t": "image-to-image strength", "c": "CLIP prompt", "f": "output file name", "dsd1": "Deep Shrink",
    "dst1": "Deep Shrink", "dsd2": "Deep Shrink", "dst2": "Deep Shrink", "dsr": "Deep Shrink",
    "glt": "Gradual Latent", "glr": "Gradual Latent", "gle": "Gradual Latent", "gls": "Gradual Latent",
    "glsn": "Gradual Latent", "glus": "Gradual Latent",
}


class PromptFileError(ValueError):
    """A prompt file is unreadable or holds a bad line; the message names ``file:line``."""


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt and the settings its line gives (None: the consumer's setting)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None  # one of ldm.diffusion.samplers.SAMPLERS
    where: str = ""  # "file:line", for errors found later (a size the model cannot take)

    def has_settings(self) -> bool:
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self)
                   if f.name not in ("prompt", "where"))


# ---- one setting: its kohya option letter, its .json/.toml key, and how its text value is read


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"\d{1,19}", text) or not low <= int(text) <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(text)

    return parse


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number >= 0")
    return value


def _text(text: str) -> str:
    if not text:
        raise ValueError("needs a value")
    return text


def _sampler(text: str) -> str:
    name = text.lower()
    if name in SAMPLERS:
        return name
    if name in KOHYA_SAMPLERS:
        return KOHYA_SAMPLERS[name]
    choices = f"use one of {sorted(KOHYA_SAMPLERS)} (kohya's names) or {sorted(SAMPLERS)}"
    if name in KOHYA_ONLY_SAMPLERS:
        raise ValueError(f"kohya's sampler {text!r} is not available here; {choices}")
    raise ValueError(f"unknown sampler {text!r}; {choices}")


@dataclass(frozen=True)
class _Setting:
    field: str  # of SamplePrompt
    flag: str  # kohya's option letter(s) in a text line
    key: str  # kohya's key in a .json/.toml entry
    parse: Callable[[str], Any]


SETTINGS = (
    _Setting("negative_prompt", "n", "negative_prompt", _text),
    _Setting("width", "w", "width", _whole(1, MAX_SIDE)),
    _Setting("height", "h", "height", _whole(1, MAX_SIDE)),
    _Setting("seed", "d", "seed", _whole(0, MAX_SEED)),
    _Setting("guidance_scale", "l", "scale", _guidance),
    _Setting("steps", "s", "sample_steps", _whole(1, MAX_STEPS)),
    _Setting("sampler", "ss", "sample_sampler", _sampler),
)
BY_FLAG = {s.flag: s for s in SETTINGS}
BY_KEY = {s.key: s for s in SETTINGS}


def _set(fields: dict, setting: _Setting, label: str, value: str, where: str) -> None:
    if setting.field in fields:
        raise PromptFileError(f"{where}: {label} is given twice")
    try:
        fields[setting.field] = setting.parse(value)
    except ValueError as err:
        raise PromptFileError(f"{where}: {label} {value!r}: {err}") from None


# ---- the text form


def parse_line(line: str, where: str) -> SamplePrompt:
    """One kohya prompt line (not a comment, not blank) -> its SamplePrompt; errors name ``where``."""
    prompt, *options = line.strip().split(" --")
    prompt = prompt.strip()
    if not prompt or prompt.startswith("--"):
        raise PromptFileError(f"{where}: no prompt before the options (a line is: prompt --w 512 --h 512 ...)")
    fields: dict[str, Any] = {}
    for option in options:
        flag, value = (option.split(None, 1) + ["", ""])[:2]
        flag = flag.lower()
        if flag not in BY_FLAG:
            what = UNSUPPORTED_OPTIONS.get(flag)
            said = f"kohya's --{flag} ({what}) is not supported here" if what else f"unknown option --{flag}"
            raise PromptFileError(f"{where}: {said}; the options are {' '.join('--' + f for f in BY_FLAG)} (a "
                                  "' --' in a prompt starts an option)")
        _set(fields, BY_FLAG[flag], f"--{flag}", value.strip(), where)
    return SamplePrompt(prompt, where=where, **fields)


def parse_prompt_lines(text: str, name: str) -> list[SamplePrompt]:
    """Every prompt of a text file's contents (``name``: the file, for errors)."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if len(prompts) == MAX_PROMPTS:
            raise PromptFileError(f"{name}:{number}: more than {MAX_PROMPTS} prompts")
        prompts.append(parse_line(line, f"{name}:{number}"))
    return prompts


# ---- kohya's .json and .toml forms: entries with kohya's keys


def _from_entry(entry: Any, where: str) -> SamplePrompt:
    if isinstance(entry, str):
        return parse_line(entry, where)
    if not isinstance(entry, dict):
        raise PromptFileError(f"{where}: an entry must be a prompt line or a table of kohya's keys, got "
                              f"{type(entry).__name__}")
    unknown = sorted(set(entry) - set(BY_KEY) - {"prompt", "enum"})
    if unknown:
        raise PromptFileError(f"{where}: key(s) {unknown} not supported; the keys are "
                              f"{['prompt', *BY_KEY]}")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
    fields: dict[str, Any] = {}
    for key, value in entry.items():
        if key in BY_KEY:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise PromptFileError(f"{where}: {key} must be a string or a number, got {type(value).__name__}")
            _set(fields, BY_KEY[key], key, str(value).strip(), where)
    return SamplePrompt(prompt.strip(), where=where, **fields)


def _entries(text: str, name: str, suffix: str) -> list[tuple[Any, str]]:
    """(entry, where) of a .json list or a .toml [prompt] table with [[prompt.subset]] entries."""
    try:
        if suffix == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError / TOMLDecodeError; nesting too deep
        raise PromptFileError(f"{name}: not valid {suffix[1:].upper()} ({type(err).__name__}: {err})") from None
    if suffix == ".json":
        if not isinstance(data, list):
            raise PromptFileError(f"{name}: a .json prompt file is a list of prompt lines or objects")
        return [(entry, f"{name}: entry {i + 1}") for i, entry in enumerate(data)]
    table = data.get("prompt")
    if set(data) != {"prompt"} or not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise PromptFileError(f"{name}: a .toml prompt file is a [prompt] table of defaults with [[prompt.subset]] "
                              "entries")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    return [({**defaults, **entry} if isinstance(entry, dict) else entry, f"{name}: [[prompt.subset]] {i + 1}")
            for i, entry in enumerate(table["subset"])]


# ---- the file


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    """The prompts of a prompt file: ``.json`` / ``.toml`` in kohya's forms, any other name as text lines."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such file")
    if path.stat().st_size > MAX_BYTES:
        raise PromptFileError(f"{path}: {path.stat().st_size} bytes; a prompt file is at most {MAX_BYTES} bytes")
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)  # a file that grew since stat() is still bounded
    if len(data) > MAX_BYTES:
        raise PromptFileError(f"{path}: a prompt file is at most {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {err.start})") from None
    suffix = path.suffix.lower()
    if suffix in (".json", ".toml"):
        entries = _entries(text, str(path), suffix)
        if len(entries) > MAX_PROMPTS:
            raise PromptFileError(f"{path}: {len(entries)} prompts; a prompt file holds at most {MAX_PROMPTS}")
        prompts = [_from_entry(entry, where) for entry, where in entries]
    else:
        prompts = parse_prompt_lines(text, str(path))
    if not prompts:
        raise PromptFileError(f"{path} has no prompts (one prompt per line; # starts a comment)")
    return prompts


def check_sizes(prompts: list[SamplePrompt], multiple: int) -> None:
    """Every --w / --h a multiple of what the model downsamples by (known once the model is)."""
    for p in prompts:
        for name, side in (("--w", p.width), ("--h", p.height)):
            if side is not None and side % multiple:
                lower = max(multiple, side // multiple * multiple)
                raise PromptFileError(f"{p.where}: {name} {side} is not a multiple of {multiple}, which this model "
                                      f"needs (e.g. {lower} or {lower + multiple})")


def sampler_for(prompt: SamplePrompt, base: SamplingOptions) -> SamplingOptions:
    """``base`` (the consumer's sampler node) with the prompt's ``--ss`` and ``--s``. Another sampler keeps the
    settings of ``base`` that apply to it (spacing, steps_offset; karras for the Karras samplers, eta and
    final_alpha_one for ddim) and takes the defaults of the others."""
    changes: dict[str, Any] = {} if prompt.steps is None else {"steps": prompt.steps}
    name = prompt.sampler
    if name is not None and name != base.name:
        kept = {"eta": ETA_SAMPLERS, "karras": KARRAS_SAMPLERS, "final_alpha_one": FINAL_ALPHA_SAMPLERS}
        default = SamplingOptions()
        changes.update(name=name, **{field: getattr(base if name in applies else default, field)
                                     for field, applies in kept.items()})
    try:
        return dataclasses.replace(base, **changes).check()
    except ValueError as err:
        raise PromptFileError(f"{prompt.where}: {err}") from None


def settings_label(width: int, height: int, steps: int, guidance_scale: float, seed: int, sampler: str) -> str:
    """The short form a grid cell shows under its prompt: ``512x768 s30 g7 seed42 euler_ancestral``."""
    return f"{width}x{height} s{steps} g{guidance_scale:g} seed{seed} {sampler}"
