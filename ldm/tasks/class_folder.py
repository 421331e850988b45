"""A folder of images whose captions name a class, and the small CNN judge fit on such images.

Shared by the glyph task (ldm/tasks/glyphs/) and the benchmarks' own folders (bench/folders.py): both write
``n`` images with balanced, shuffled classes and a ``metadata.jsonl`` (the layout ``data=folder`` reads), and
judge samples with a CNN fit on real images.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F


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


def fit_shift_augmented(make_model: Callable[[], nn.Module], images: torch.Tensor, labels: torch.Tensor,
                        epochs: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Adam + one-cycle lr on cross-entropy, each batch rolled by a random shift of up to 2 px (samples are not
    centred exactly). The model is built by ``make_model`` under ``seed``; the result is in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(images) // batch_size))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for s in range(0, len(images), batch_size):
            idx = order[s:s + batch_size]
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            loss = F.cross_entropy(model(torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
