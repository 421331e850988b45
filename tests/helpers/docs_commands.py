"""The commands the docs show, and how tests/docs checks and runs them.

A command is one line of a fenced ``bash`` / ``sh`` / ``shell`` / ``console`` block of README.md, docs/*.md or
bench/README.md (backslash continuations joined, comments and a console's ``$ `` dropped, ``a && b`` split in two).
Every command has a check: its config composes and passes the checks the program makes before it builds anything,
its options exist, and the files it reads are there (placeholders replaced by the stand-ins of docs_data.py). Some
also run for real, with overrides appended that make them tiny. A command no check knows fails."""

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tests.helpers import CONFIGS, ROOT
from tests.helpers.docs_data import DocsData

DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "bench/README.md"]
SHELLS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"\s*```\s*(\S*)\s*$")


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    argv: tuple[str, ...]
    line_argvs: tuple[tuple[str, ...], ...] = ()  # every command of the same line (`a && b`)

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{program(self.argv)}"


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every fenced shell block in a Markdown text."""
    lines, block, pending = [], None, None
    for number, raw in enumerate(text.splitlines(), 1):
        fence = FENCE.match(raw)
        if fence:
            block = None if block is not None else ("shell" if fence.group(1) in SHELLS else "other")
            continue
        if block != "shell":
            continue
        line = raw.strip()
        line = line[2:] if line.startswith("$ ") else line
        start, text_so_far = pending if pending else (number, "")
        if line.endswith("\\"):
            pending = (start, text_so_far + line[:-1] + " ")
            continue
        pending = None
        if (text_so_far + line).strip():
            lines.append((start, text_so_far + line))
    return lines


def commands_in(doc: str, text: str | None = None) -> list[Command]:
    text = (ROOT / doc).read_text(encoding="utf-8") if text is None else text
    found = []
    for number, line in shell_lines(text):
        tokens = shlex.split(line, comments=True)
        parts = [tuple(group) for is_sep, group in itertools.groupby(tokens, lambda t: t == "&&") if not is_sep]
        found += [Command(doc, number, part, tuple(parts)) for part in parts]
    return found


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands_in(doc)]


MODULES = {"ldm.export": "export", "ldm.cli.export": "export", "ldm.evaluate": "evaluate", "ldm.lora": "lora",
           "ldm.cli.latent_cache": "latent_cache", "ldm.tasks.glyphs": "glyphs", "venv": "venv", "pytest": "pytest",
           "pip": "pip"}


def program(argv: tuple[str, ...]) -> str:
    """What a command runs: train, sample, export, evaluate, lora, latent_cache, glyphs, bench:NAME, pip, venv,
    activate, pytest; unknown:... for anything else."""
    head = argv[0]
    if head in (".", "source"):
        return "activate"
    if head in ("pip", "pip3"):
        return "pip"
    if head.startswith("ldm-"):
        return {"ldm-train": "train", "ldm-sample": "sample", "ldm-export": "export"}.get(head, f"unknown:{head}")
    if re.fullmatch(r"python3?(\.\d+)?", head) and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2:
            return MODULES.get(argv[2], f"unknown:python -m {argv[2]}")
        if argv[1] in ("train.py", "sample.py"):
            return argv[1][:-3]
        if re.fullmatch(r"bench/\w+\.py", argv[1]):
            return f"bench:{Path(argv[1]).stem}"
    return f"unknown:{head}"


def arguments(argv: tuple[str, ...]) -> list[str]:
    """The arguments after the program (python train.py / python -m module / ldm-x / pip)."""
    if argv[0].startswith("ldm-") or argv[0] in ("pip", "pip3", ".", "source"):
        return list(argv[1:])
    return list(argv[3:] if argv[1] == "-m" else argv[2:])


# ---- configs and files


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def sweep(overrides: list[str]) -> list[list[str]]:
    """`-m a=1,2 b=x,y`: the override lists of every combination, as Hydra's basic sweeper makes them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in OverridesParser.create().parse_overrides(overrides)]
    return [list(combo) for combo in itertools.product(*choices)]


def config_value(cfg: DictConfig, key: str):
    """The value at key, None where it or its parent is absent; a value left ??? fails (the command must set it)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node.keys():  # `in node` is False for ??? too
        return None
    assert not OmegaConf.is_missing(node, leaf), f"{key} is not set (???): the command must give it"
    return node[leaf]


def hub_id(value) -> bool:
    from ldm.formats.detect import looks_like_hub_id

    return looks_like_hub_id(str(value))


def parse(parser, args: list[str]):
    """argparse's result; a bad option fails the test instead of exiting."""
    try:
        return parser.parse_args(args)
    except SystemExit as exit_:
        raise AssertionError(f"{parser.prog}: the arguments {args} do not parse (exit {exit_.code})") from exit_


# train.py keys that name files or folders a run reads (a class folder is filled when it is not there)
TRAIN_INPUTS = ["data.train.root", "data.train.conditioning_root", "data.train.instance_root", "data.train.class_root",
                "data.train.mask_root",
                "data.train.path", "data.train.urls", "model.pretrained", "model.autoencoder.weights",
                "adapter.init_from", "ckpt_path", "callbacks.sampling.prompt_file"]
MADE_IF_MISSING = {"data.train.class_root"}
# appended to a train.py command that runs for real, after the tiny model (TINY_MODEL): 2 steps, no DataLoader
# worker processes (forked from the test process, whose threads can deadlock them; the docs' runs are processes
# of their own)
TINY_TRAIN = ["trainer.max_steps=2", "data.num_workers=0"]
TINY_BUCKETS = ["data.train.buckets.step=8"]  # a bucket step that fits TINY_MODEL's 16 px
TINY_SAMPLE = ["sampler.steps=2", "n_images=1", "batch_size=1", "check_memory=false"]


class Checks:
    """Checks, or runs, one command in the current working folder (a fresh tmp_path)."""

    def __init__(self, docs: DocsData, tmp: Path):
        self.docs, self.tmp = docs, tmp

    def check(self, command: Command) -> None:
        kind = program(command.argv)
        handler = getattr(self, "check_" + kind.partition(":")[0], None)
        assert handler is not None, f"no check for `{command.text}` ({kind}): add one to tests/helpers/docs_commands.py"
        handler(command, kind.partition(":")[2])

    def run(self, command: Command) -> None:
        kind = program(command.argv)
        handler = getattr(self, "run_" + kind.partition(":")[0], None)
        assert handler is not None, f"`{command.text}` has no real run: it is checked only"
        handler(command, kind.partition(":")[2])

    def input(self, value, what: str) -> None:
        """A file or folder the command reads: its stand-in when it is a placeholder; it must be there."""
        self.docs.provide(value)
        assert Path(str(value)).exists(), f"{what}: {value} is not there"

    # ---- python train.py

    def train_configs(self, command: Command, extra: list[str] = ()) -> list[DictConfig]:
        from tests.helpers.training import compose_train

        args = [a for a in arguments(command.argv) if a not in ("-m", "--multirun")]
        overrides = self.docs.substitute(args) + list(extra)
        multirun = len(args) < len(arguments(command.argv))
        return [compose_train(self.tmp, combo) for combo in (sweep(overrides) if multirun else [overrides])]

    def train_inputs(self, cfg: DictConfig) -> None:
        from braceexpand import braceexpand

        for key in TRAIN_INPUTS:
            value = config_value(cfg, key)
            if value is None or str(value).startswith("builtin:") or value in ("auto", "last"):
                continue
            if key in ("model.pretrained", "data.train.path") and hub_id(value):
                continue
            self.docs.provide(value)
            paths = list(braceexpand(str(value))) if key == "data.train.urls" else [value]
            for path in paths:
                assert key in MADE_IF_MISSING or Path(str(path)).exists(), f"{key}: {path} is not there"

    def check_train(self, command: Command, _: str) -> None:
        for cfg in self.train_configs(command):
            self.train_inputs(cfg)
            checked_before_build(cfg)

    def run_train(self, command: Command, _: str) -> None:
        from ldm.training.run.train import train
        from tests.helpers.training import TINY_MODEL

        own_model = any(a.startswith("model=") for a in command.argv)  # model=sdxl_tiny: small already
        tiny = [o for o in TINY_MODEL if not (own_model and o.startswith("model."))]
        buckets = TINY_BUCKETS if "data.train.buckets.enabled=true" in command.argv else []
        controlnet = ["adapter.hint_channels=[8,16]"] if "adapter=controlnet" in command.argv else []  # VAE factor 2
        cfg = self.train_configs(command, tiny + TINY_TRAIN + buckets + controlnet)[0]
        self.train_inputs(cfg)
        assert train(cfg)["global_step"] == 2

    # ---- python sample.py

    def sample_config(self, command: Command, extra: list[str] = ()) -> DictConfig:
        from ldm.formats.embeddings import parse_embedding_spec
        from ldm.formats.lora_files import parse_lora_spec
        from ldm.pipelines.cli import register_configs, typed_config

        register_configs()
        cfg = typed_config(compose_config("sample", self.docs.substitute(arguments(command.argv)) + list(extra)))
        if not hub_id(cfg.ckpt):
            self.input(cfg.ckpt, "ckpt")
        for key in ("init_image", "mask", "prompt_file", "text_encoder"):
            if cfg[key] is not None and not (key == "text_encoder" and hub_id(cfg[key])):
                self.input(cfg[key], key)
        for spec in cfg.lora:
            self.input(parse_lora_spec(spec)[0], "lora")
        for spec in cfg.embeddings:
            self.input(parse_embedding_spec(spec)[0], "embeddings")
        for key in ("controlnet", "control_image"):
            for value in [cfg[key]] if isinstance(cfg[key], str) else (cfg[key] or []):
                self.input(value, key)
        return cfg

    def check_sample(self, command: Command, _: str) -> None:
        from ldm.pipelines.cli import check_options, prepare_out_dir, read_images, read_prompts

        cfg = self.sample_config(command)
        check_options(cfg)  # what sample(cfg) checks before the model loads
        read_prompts(cfg)
        read_images(cfg)
        prepare_out_dir(cfg)

    def run_sample(self, command: Command, _: str) -> None:
        from ldm.pipelines.cli import sample

        sizes = [f"{k}=16" for k in ("height", "width") if any(a.startswith(f"{k}=") for a in command.argv)]
        assert sample(self.sample_config(command, TINY_SAMPLE + sizes))

    # ---- python -m ldm.export (ldm-export)

    def export_args(self, command: Command):
        from ldm.cli.export import build_parser

        args = parse(build_parser(), self.docs.substitute(arguments(command.argv)))
        if not hub_id(args.source):
            self.input(args.source, "source")
        for spec in args.merge_lora:
            self.input(spec.rpartition(":")[0] if re.search(r":[-+.\d]+$", spec) else spec, "--merge-lora")
        if args.text_encoder is not None:
            self.input(args.text_encoder, "--text-encoder")
        assert not Path(args.out).exists(), f"--out {args.out} is already there"
        return args

    def check_export(self, command: Command, _: str) -> None:
        self.export_args(command)

    def run_export(self, command: Command, _: str) -> None:
        from ldm.cli.export import main

        args = self.export_args(command)
        # the stand-in <checkpoint> is a tiny model that ComfyUI cannot load: a single file of it is refused unless
        # asked for (ldm.formats.comfyui_check); the docs' command is for SD-sized models, which pass as written
        unloadable = ["--allow-unloadable"] if args.fmt == "single-file" and not args.allow_unloadable else []
        assert main(self.docs.substitute(arguments(command.argv)) + unloadable) == 0

    # ---- python -m ldm.lora

    def lora_args(self, command: Command) -> list[str]:
        from ldm.cli.lora import build_parser
        from ldm.formats.lora_files import parse_lora_spec

        args = self.docs.substitute(arguments(command.argv))
        parsed = parse(build_parser(), args)
        for spec in getattr(parsed, "loras", None) or [getattr(parsed, "lora", None)]:
            if spec is not None:
                self.input(parse_lora_spec(spec)[0], parsed.command)
        for option in ("model", "base", "tuned"):
            value = getattr(parsed, option, None)
            if value is not None and not hub_id(value):
                self.input(value, f"--{option}")
        assert not Path(parsed.out).exists(), f"--out {parsed.out} is already there"
        return args

    def check_lora(self, command: Command, _: str) -> None:
        self.lora_args(command)

    def run_lora(self, command: Command, _: str) -> None:
        from ldm.cli.lora import main

        assert main(self.lora_args(command)) == 0

    # ---- python -m ldm.evaluate

    def evaluate_config(self, command: Command, extra: list[str] = ()) -> DictConfig:
        from ldm.cli.evaluate import check_options, data_config, typed_config
        from ldm.cli.evaluate_config import compose_evaluate
        from ldm.evaluate import overrides_from_argv

        cfg = typed_config(compose_evaluate(overrides_from_argv(self.docs.substitute(arguments(command.argv)))
                                            + list(extra)))
        self.input(cfg.ckpt, "ckpt")
        check_options(cfg)  # what evaluate(cfg) checks before the model loads
        data_config(cfg)
        return cfg

    def check_evaluate(self, command: Command, _: str) -> None:
        self.evaluate_config(command)

    def run_evaluate(self, command: Command, _: str) -> None:
        from ldm.cli.evaluate import evaluate

        assert evaluate(self.evaluate_config(command, ["n=2", "sampler.steps=2"]))["n"] == 2

    # ---- python -m ldm.cli.latent_cache, python -m ldm.tasks.glyphs

    def latent_cache_args(self, command: Command) -> list[str]:
        from ldm.cli.latent_cache import build_parser

        args = arguments(command.argv)
        args = ["latents", *self.docs.substitute(args[1:])]  # the output: a new folder here
        parsed = parse(build_parser(), args)
        if parsed.source in ("folder", "webdataset") or (parsed.source == "hf" and not hub_id(parsed.path)):
            self.input(parsed.path, "--path")
        if parsed.vae_weights is not None:
            self.input(parsed.vae_weights, "--vae-weights")
        return args

    def check_latent_cache(self, command: Command, _: str) -> None:
        self.latent_cache_args(command)

    def run_latent_cache(self, command: Command, _: str) -> None:
        from ldm.cli.latent_cache import main

        tiny = ["--resolution", "16", "--vae-preset", "tiny", "--device", "cpu", "--no-progress"]
        assert main(self.latent_cache_args(command) + tiny)["num_samples"] > 0

    def check_glyphs(self, command: Command, _: str) -> None:
        """The glyph writer has no separate parser: it is run, into a new folder here, with 20 images."""
        from ldm.tasks.glyphs.dataset import main

        args = arguments(command.argv)
        main(["glyphs", *args[1:], "--n", "20"])
        assert len(list(Path("glyphs").glob("*.png"))) == 20

    # ---- benchmarks, installs, tests

    def check_bench(self, command: Command, name: str) -> None:
        from tests.helpers.bench import bench_module

        args = parse_bench(bench_module(name), self.docs.substitute(arguments(command.argv)))
        for option in ("base", "run"):
            value = getattr(args, option, None)
            if isinstance(value, (str, Path)):  # a path it reads (plain_folder's --run is a switch)
                self.input(value, f"--{option}")

    def check_pip(self, command: Command, _: str) -> None:
        check_install(arguments(command.argv))

    def check_venv(self, command: Command, _: str) -> None:
        python = re.fullmatch(r"python(3\.\d+)", command.argv[0])
        required = pyproject()["project"]["requires-python"]
        assert python and required == f">={python.group(1)}", f"{command.argv[0]} vs requires-python {required}"

    def check_activate(self, command: Command, _: str) -> None:
        venv = command.argv[1].removesuffix("/bin/activate")
        assert any(p[1:4] == ("-m", "venv", venv) for p in command.line_argvs), f"no `-m venv {venv}` before it"

    def check_pytest(self, command: Command, _: str) -> None:
        assert all((ROOT / p).is_dir() for p in pyproject()["tool"]["pytest"]["ini_options"]["testpaths"])
        assert "python -m pytest" in (ROOT / ".ci" / "run").read_text(), ".ci/run runs the tests another way"


def checked_before_build(cfg: DictConfig) -> None:
    """What train(cfg) checks before it builds anything (ldm/training/run/train.py): the auto defaults and the caption
    vocabulary resolved from the data, the values, the pretrained model a full-size preset needs."""
    from ldm.training.run.auto_defaults import resolve_auto
    from ldm.training.run.auto_defaults import choose_resolution
    from ldm.training.run.caption_vocab import resolve_caption_vocab
    from ldm.training.run.stages import check_pretrained
    from ldm.training.run.train import validate

    choose_resolution(cfg)
    if cfg.stage == "diffusion":
        resolve_auto(cfg)
        resolve_caption_vocab(cfg)
        check_pretrained(cfg.model)
    validate(cfg)


def parse_bench(module, args: list[str]):
    try:
        return module.parse_args(args)
    except SystemExit as exit_:
        raise AssertionError(f"{module.__name__}: the arguments {args} do not parse (exit {exit_.code})") from exit_


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def check_install(args: list[str]) -> None:
    """`pip install torch==X` (the pin .ci/run installs), `-e .` and `-e ".[extra]"` (an extra of pyproject)."""
    assert args[0] == "install", f"pip {' '.join(args)}"
    ci = (ROOT / ".ci" / "run").read_text()
    for arg in args[1:]:
        if arg == "-e":
            continue
        if arg.startswith("torch=="):
            assert f"install -q {arg}" in ci, f"{arg} is not the torch .ci/run installs"
            continue
        extra = re.fullmatch(r"\.(?:\[(\w+)\])?", arg)
        assert extra, f"pip install {arg}: only the project (and torch) are installed from the docs"
        if extra.group(1):
            assert extra.group(1) in pyproject()["project"]["optional-dependencies"], f"no extra [{extra.group(1)}]"
