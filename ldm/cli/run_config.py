"""A training run's ``config.yaml`` as bounded data: where ``python -m ldm.evaluate <run>/checkpoints/x.ckpt`` takes
the run's data from when no ``data=`` is given.

A run folder may have been downloaded, so nothing its config.yaml holds may reach the user's environment, a shell
or the network:

- only a training run's own layout counts, ``<run>/checkpoints/<name>.ckpt`` beside ``<run>/config.yaml``: an
  export folder, or a single file whose folder happens to hold some config.yaml, is not a run (``data=`` then);
- the file is small plain YAML: no anchors / aliases (a few nested ones expand to gigabytes), bounded nesting;
- an interpolation in the data node is resolved only when it names another node of the same file (``${seed}``,
  ``${data.train.colors}``), followed through the nodes it names; a resolver (``${oc.env:...}``, ``${oc.decode:...}``,
  any ``${name:...}``) is never called: it would read the user's environment into a URL or a shell command;
- the data it describes is read from local files and folders that exist, and they are named in a log line: no URL
  of any scheme, no ``pipe:`` shard (webdataset opens one with a shell), no hub dataset id.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import yaml
from omegaconf import OmegaConf

from ldm.cli.evaluate_config import EvaluateConfigError
from ldm.formats.safe_paths import is_inside

RUN_CONFIG = "config.yaml"
MAX_BYTES = 1 << 20  # a run's config.yaml is ~10 KB
MAX_DEPTH = 64
MAX_SHARDS = 100_000  # webdataset shards one brace pattern may name
MAX_INTERPOLATED = 1000  # strings with interpolations followed (a run's data node has a handful)
DATA_MODULE = "ldm.data.datamodule.ImageCaptionDataModule"
WEBDATASET = "ldm.data.webdataset.WebDatasetSource"
HF_DATASET = "ldm.data.hf_dataset.HFDataset"
CONTROL_PAIRS = "ldm.data.control_pairs.ControlPairsDataset"  # a folder pair, or an HF dataset at `path`
SET_DATA = "set data=<a configs/data/ option> (with data.<key>=... as needed) instead"

# The keys of our data classes that name files or folders. Every class configs/data/*.yaml may build is listed (a
# test checks it), so a new class comes with the keys it reads from; a class not listed is refused.
PATH_KEYS: dict[str, tuple[str, ...]] = {
    DATA_MODULE: (),  # its latent_cache is dropped: evaluation reads the images (see without_cache)
    "ldm.tasks.shapes.dataset.ShapesDataset": (),
    "ldm.data.image_folder.ImageFolderDataset": ("root",),
    "ldm.data.dreambooth.DreamBoothDataset": ("instance_root", "class_root", "mask_root"),
    HF_DATASET: ("path",),
    "ldm.data.cached_latents.CachedLatentsDataset": ("path",),
    WEBDATASET: ("urls",),
    CONTROL_PAIRS: ("root", "conditioning_root", "path"),
    "ldm.tasks.shapes.silhouette.SilhouetteShapesDataset": (),
}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, pipe:, s3:, hf:, file:, ...


def refuse(saved: Path, key: str, why: str) -> EvaluateConfigError:
    return EvaluateConfigError(f"{saved}: {key}: {why}; {SET_DATA}")


def run_config_path(ckpt: str) -> Path | None:
    """``<run>/config.yaml`` of a checkpoint in a training run's layout (``<run>/checkpoints/<name>.ckpt``), else
    None: any other file or folder has no run config, whatever files lie beside it."""
    path = Path(ckpt)
    if path.suffix != ".ckpt" or path.parent.name != "checkpoints" or not path.is_file():
        return None
    saved = path.parent.parent / RUN_CONFIG
    return saved if saved.is_file() else None


def read_run_config(saved: Path) -> dict:
    """The file as plain containers, interpolations left as written."""
    if not is_inside(saved, saved.parent):
        raise refuse(saved, "file", "a symbolic link out of the run folder; refusing to read it")
    if saved.stat().st_size > MAX_BYTES:
        raise refuse(saved, "file", f"{saved.stat().st_size} bytes, more than a run config holds ({MAX_BYTES})")
    try:
        text = saved.read_text(encoding="utf-8")
        check_plain_yaml(text, saved)
        raw = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except EvaluateConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - yaml / omegaconf / unicode errors: name the file
        raise refuse(saved, "file", f"not a readable run config ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict):
        raise refuse(saved, "file", "not a mapping of config keys")
    return raw


def check_plain_yaml(text: str, saved: Path) -> None:
    """No aliases, nesting at most MAX_DEPTH: checked on the event stream, before anything is built from it."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise refuse(saved, "file", f"YAML alias *{event.anchor} (a run config written by ldm has none, and a few "
                                        "nested aliases expand to gigabytes)")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise refuse(saved, "file", f"nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def without_cache(raw: dict) -> dict:
    """The data module's ``latent_cache`` dropped: evaluation reads the images themselves, and the stored value
    (``${paths.cache_dir}/latents``) would only resolve through the environment (``oc.env``)."""
    data = raw.get("data")
    if isinstance(data, dict) and data.get("_target_") == DATA_MODULE and "latent_cache" in data:
        raw = {**raw, "data": {**data, "latent_cache": None}}
    return raw


# ---------------------------------------------------------------------------------------------- interpolations

def resolved_data(raw: dict, saved: Path) -> Any:
    """``raw["data"]`` with its interpolations resolved, once every one of them (and every one in the nodes they
    name, and so on) is known to name a node of this file and to use no resolver."""
    pending, seen, parsed = [(("data",), "data")], set(), 0  # (node path, the key that names it)
    while pending:
        path, named_by = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for key_path, text in _strings(_node_at(raw, path, saved, named_by), path):
            parsed += "${" in text
            if parsed > MAX_INTERPOLATED:  # each is parsed by omegaconf's grammar: bounded time
                raise refuse(saved, ".".join(key_path), f"more than {MAX_INTERPOLATED} interpolated values")
            for ref in node_references(text, saved, ".".join(key_path)):
                pending.append((_absolute(ref, key_path, saved), ".".join(key_path)))
    try:
        data = OmegaConf.to_container(OmegaConf.create(raw)["data"], resolve=True)
    except Exception as err:  # noqa: BLE001 - omegaconf's resolution errors: name the file
        raise refuse(saved, "data", f"cannot be resolved ({type(err).__name__}: {err})") from None
    for key_path, text in _strings(data, ("data",)):
        if "${" in text:  # an escaped \${...} resolves to an interpolation, which building the data would resolve
            raise refuse(saved, ".".join(key_path), "holds '${' (an escaped interpolation)")
    return data


def node_references(text: str, saved: Path, key: str) -> list[str]:
    """The node keys ``text`` interpolates (``${seed}`` -> "seed", ``${..x}`` -> "..x"); an EvaluateConfigError for
    a resolver, or an interpolation inside a key."""
    if "${" not in text:
        return []
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as Grammar

    try:
        stack = [grammar_parser.parse(text)]
    except Exception:  # noqa: BLE001 - omegaconf's GrammarParseError
        raise refuse(saved, key, "not a valid interpolation") from None
    refs = []
    while stack:
        node = stack.pop()
        if isinstance(node, Grammar.InterpolationResolverContext):
            raise refuse(saved, key, f"uses the resolver ${{{node.resolverName().getText()}:...}}: a run config "
                                     "from a file is never resolved against this machine (its environment, files "
                                     "or the network), and the run's data cannot be taken from it")
        if isinstance(node, Grammar.InterpolationNodeContext):
            name = node.getText()[2:-1].strip()
            if "${" in name or "[" in name:
                raise refuse(saved, key, f"interpolates ${{{name}}} (only plain node keys are followed)")
            refs.append(name)
            continue
        stack.extend(getattr(node, "children", None) or [])
    return refs


def _absolute(ref: str, key_path: tuple[str, ...], saved: Path) -> tuple[str, ...]:
    """The absolute key path of ``ref`` as written at ``key_path`` (``${.x}``: a sibling, ``${..x}``: one up)."""
    dots = len(ref) - len(ref.lstrip("."))
    parts = tuple(ref[dots:].split(".")) if ref[dots:] else ()
    if dots == 0:
        return parts
    if dots > len(key_path):
        raise refuse(saved, ".".join(key_path), f"interpolates ${{{ref}}}, above the top of the file")
    return key_path[: len(key_path) - dots] + parts


def _node_at(raw: Any, path: tuple[str, ...], saved: Path, key: str) -> Any:
    node = raw
    for part in path:
        if isinstance(node, dict) and (part in node or (part.isdigit() and int(part) in node)):
            node = node[part] if part in node else node[int(part)]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise refuse(saved, key, f"names {'.'.join(path)}, which is not in the file")
    return node


def _strings(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """(key path, value) of every string under ``node`` (depth is bounded by check_plain_yaml)."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, (*path, str(i)))


# ---------------------------------------------------------------------------------------------- local paths

def local_paths(data: Any, saved: Path, key: str = "data") -> list[str]:
    """Check every file or folder the (resolved) data node reads, in place made absolute; returns them as
    "key=path" for the log line. Its ``_target_``s are our data classes already (check_targets)."""
    shown: list[str] = []
    if isinstance(data, list):
        for i, v in enumerate(data):
            shown += local_paths(v, saved, f"{key}[{i}]")
        return shown
    if not isinstance(data, dict):
        return shown
    target = data.get("_target_")
    if target is not None:
        if target not in PATH_KEYS:
            raise refuse(saved, f"{key}._target_", f"{target!r}: which files it reads is not known")
        if "_args_" in data:
            raise refuse(saved, f"{key}._args_", "positional arguments are not read from a run config")
        for name in PATH_KEYS[target]:
            if data.get(name) is not None:
                data[name] = _checked(target, data, name, saved, f"{key}.{name}")
                shown += [f"{key}.{name}={p}" for p in (data[name] if isinstance(data[name], list) else [data[name]])]
    for k, v in data.items():
        if k not in PATH_KEYS.get(target, ()):
            shown += local_paths(v, saved, f"{key}.{k}")
    return shown


def _checked(target: str, node: dict, name: str, saved: Path, key: str) -> str | list[str]:
    value = node[name]
    if target == WEBDATASET:
        return [str(local_path(url, saved, key, file=True)) for url in shard_list(value, saved, key)]
    path = local_path(value, saved, key)
    if target == HF_DATASET or (target == CONTROL_PAIRS and name == "path"):
        from ldm.data.hf_dataset import is_saved_dataset

        # datasets.load_dataset on a folder reads what its README's configs name (URLs too): only a folder that
        # Dataset.save_to_disk wrote is read from a run config
        if not is_saved_dataset(path) or node.get("load_from_disk", "auto") is False:
            raise refuse(saved, key, f"{path} is not a folder written by Dataset.save_to_disk (load_dataset could "
                                     "fetch what it names)")
    return str(path)


def local_path(value: Any, saved: Path, key: str, file: bool = False) -> Path:
    """``value`` as an absolute local path that exists: never a URL (any scheme, ``pipe:`` too) or a hub id."""
    if not isinstance(value, str) or not value.strip():
        raise refuse(saved, key, f"{value!r} is not a path")
    if _SCHEME.match(value) or "://" in value:
        raise refuse(saved, key, f"{value!r} is a URL or a command (a run config from a file drives evaluation only "
                                 "through local paths)")
    path = Path(value).expanduser().absolute()
    if not (path.is_file() if file else path.exists()):
        raise refuse(saved, key, f"{value!r} is not a local {'file' if file else 'file or folder'} that exists here "
                                 "(a hub id, or a path on the machine that trained the run?)")
    return path


def shard_list(urls: Any, saved: Path, key: str) -> list[str]:
    """webdataset's ``urls`` (a list, or a string of "::"-joined brace patterns) as the list of shards it names,
    expanded only once the count is known to be at most MAX_SHARDS, and without webdataset's ``${WDS_...}``
    environment substitution."""
    if isinstance(urls, list):
        if len(urls) > MAX_SHARDS:
            raise refuse(saved, key, f"{len(urls)} shards, more than {MAX_SHARDS}")
        return urls
    if not isinstance(urls, str):
        raise refuse(saved, key, f"{urls!r} is not a shard list")
    from braceexpand import braceexpand  # webdataset's own expander (a dependency of webdataset)

    shards: list[str] = []
    for pattern in urls.split("::"):
        count = brace_count(pattern)
        if count is None or len(shards) + count > MAX_SHARDS:
            raise refuse(saved, key, f"{pattern[:200]!r}: a brace pattern naming more than {MAX_SHARDS} shards, "
                                     "nested, or unbalanced")
        shards += list(braceexpand(pattern))
    return shards


_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d{1,18})\.\.(-?\d{1,18})(?:\.\.-?\d{1,18})?|([A-Za-z])\.\.([A-Za-z])(?:\.\.-?\d{1,18})?")


def brace_count(pattern: str) -> int | None:
    """How many names a brace pattern expands to (an upper bound), None when it has nested or unbalanced braces
    or names more than MAX_SHARDS: counted from the text, since braceexpand builds whole ranges in memory."""
    if "{" in _GROUP.sub("", pattern) or "}" in _GROUP.sub("", pattern):
        return None
    count = 1
    for group in _GROUP.findall(pattern):
        m = _RANGE.fullmatch(group)
        if m and m[1] is not None:
            count *= abs(int(m[2]) - int(m[1])) + 1
        elif m:
            count *= abs(ord(m[4]) - ord(m[3])) + 1
        elif ".." in group:  # a range _RANGE does not read (a 30-digit bound): not counted, so not expanded
            return None
        else:
            count *= group.count(",") + 1
        if count > MAX_SHARDS:
            return None
    return count
