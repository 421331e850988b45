"""Run folders: each run gets a folder of its own, and a resume leaves no stray folder behind.

``hydra.run.dir`` (configs/hydra/default.yaml) names its folder through the ``ldm_unique_dir`` resolver:
the folder is created with ``os.mkdir`` (which fails if it exists), so two runs started in the same second
get ``<time>`` and ``<time>-1`` instead of sharing one folder (interleaved metrics.csv, one config.yaml).

A run folder may come from elsewhere (downloaded, then resumed): ``refuse_links_out`` stops a run before it writes
anything into a folder that ships a symbolic link out of it where the run writes.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from omegaconf import OmegaConf

from ldm.formats.safe_paths import is_inside
from ldm.training.run.config_checks import ConfigError

_claimed: dict[str, str] = {}  # base path -> the folder this process created for it


def unique_dir(base: str) -> str:
    """Create ``base`` exclusively, else ``base-1``, ``base-2``, ...; return the one created.

    Hydra may resolve ``hydra.run.dir`` more than once: the same process asking again gets the same folder."""
    base = str(base)
    if base in _claimed:
        return _claimed[base]
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        candidate = base if n == 0 else f"{base}-{n}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        _claimed[base] = candidate
        return candidate
    raise AssertionError("unreachable")


def register_resolver() -> None:
    OmegaConf.register_new_resolver("ldm_unique_dir", unique_dir, replace=True, use_cache=True)


def created_here() -> list[Path]:
    """The run folders ``ldm_unique_dir`` created in this process (Hydra's folder of this job)."""
    return [Path(p) for p in _claimed.values()]


HYDRA_FILES = (".hydra",)  # what Hydra writes into a job's folder, besides <job>.log


def fold_into(fresh: Path, run_dir: Path) -> None:
    """Resume: Hydra made ``fresh`` for this process, but the run continues in ``run_dir``. Move what Hydra
    wrote there (``.hydra/``, ``<job>.log``) into ``run_dir`` under a ``resume-<n>`` name and remove ``fresh``,
    so no near-empty timestamped folder is left behind. The log keeps being written: a rename keeps the open
    file. Anything else in ``fresh`` (not Hydra's) stays where it is, and so does the folder."""
    fresh, run_dir = fresh.resolve(), run_dir.resolve()
    if fresh == run_dir or not fresh.is_dir() or run_dir in fresh.parents or fresh in run_dir.parents:
        return
    entries = list(fresh.iterdir())
    if not all(e.name in HYDRA_FILES or (e.is_file() and e.suffix == ".log") for e in entries):
        return
    n = 1 + sum(1 for _ in run_dir.glob("resume-*"))
    while (run_dir / f"resume-{n}").exists():
        n += 1
    target = run_dir / f"resume-{n}"
    target.mkdir()
    for e in entries:
        os.replace(e, target / e.name.lstrip("."))
    fresh.rmdir()


def refuse_links_out(run_dir: Path) -> None:
    """A ConfigError naming the first symbolic link in ``run_dir`` (at any depth) that resolves outside it.

    A run writes config.yaml, checkpoints/ (and the files in it), metrics.csv, samples/, bad_samples/, logs and
    more into its folder, and Lightning's loggers and callbacks write wherever they were told under it: rather than
    list every name, no link out is accepted anywhere in the folder. Links that stay inside (Lightning's
    ``save_last="link"``) are fine: whatever is written through them lands in the run folder."""
    if not run_dir.is_dir():
        return
    for folder, dirs, files in os.walk(run_dir):  # links to folders are listed in dirs and not followed
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if path.is_symlink() and not is_inside(path, run_dir):
                raise ConfigError(f"{path} is a symbolic link to {os.readlink(path)}, outside the run folder "
                                  f"{run_dir}: a run writes there and never through a link out (a folder from "
                                  "elsewhere may point one at any file of yours). Remove the link (or replace it "
                                  "with a copy of what it points to) and run again")
