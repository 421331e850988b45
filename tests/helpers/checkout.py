"""What `git status` says about the checkout, to check that the tests leave it as they found it."""

import subprocess
from pathlib import Path


def byproduct(line: str) -> bool:
    """Written by importing modules and by pytest itself, whatever the tests do: not compared."""
    path = line[3:]
    return "__pycache__/" in path or path.endswith(".pyc") or ".pytest_cache/" in path or ".egg-info/" in path


def checkout_state(root: Path) -> list[str] | None:
    """`git status --porcelain` of root, sorted: changed tracked files, every untracked file, and ignored paths
    (run folders such as outputs/ or lightning_logs/ are in .gitignore and would not show otherwise; an ignored
    folder is one line, so a file added inside one that was already there does not show). None outside a git
    checkout, or without git."""
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored=matching"],
                              cwd=root, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return sorted(line for line in proc.stdout.splitlines() if not byproduct(line))


def changes(before: list[str], after: list[str]) -> str:
    """The lines of `git status` that appeared or went away, one per line."""
    return "\n".join([*(f"  new:  {line}" for line in after if line not in before),
                      *(f"  gone: {line}" for line in before if line not in after)])
