"""A folder of images whose captions name a class (the layout ``data=folder`` reads): what the glyph task
(ldm/tasks/glyphs/) and the benchmarks' own folders (bench/folders.py) write."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image


def write_class_folder(root: str | Path, n: int, classes: Sequence[str], templates: Sequence[str],
                       render: Callable[[str, random.Random, int], Image.Image], resolution: int = 32,
                       seed: int = 0) -> Path:
    """``n`` images ``render(class, rng, resolution)`` (classes balanced, order shuffled) as ``00000.png``... and
    their ``metadata.jsonl`` rows ``{"file_name", "text": a template naming the class, "label": the class}``.
    The same arguments always give the same files."""
    if n < len(classes):
        raise ValueError(f"n={n}: need at least one image per class ({len(classes)})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    labels = [classes[i % len(classes)] for i in range(n)]
    rng.shuffle(labels)
    rows = []
    for i, cls in enumerate(labels):
        name = f"{i:05d}.png"
        render(cls, rng, resolution).save(root / name)
        rows.append({"file_name": name, "text": rng.choice(templates).format(c=cls), "label": cls})
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return root
