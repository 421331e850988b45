"""PNG output with the generation parameters in text chunks, written byte-for-byte reproducibly.

``parameters`` holds A1111-style text (prompt, "Negative prompt: ...", then "Key: value, ..."), which image
viewers and web UIs read; ``ldm_parameters`` holds the same as JSON. No timestamps, fixed compression.
"""

from __future__ import annotations

import json
from pathlib import Path

COMPRESS_LEVEL = 6
LABELS = {"cfg_scale": "CFG scale", "use_ema": "EMA"}  # A1111's spelling; other keys: "batch_size" -> "Batch size"


def parameters_text(params: dict) -> str:
    """A1111 layout: prompt line, negative prompt line, then the other settings as "Key: value" pairs."""
    rest = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt") and v is not None}
    pairs = ", ".join(f"{LABELS.get(k, k.replace('_', ' ').capitalize())}: {v}" for k, v in rest.items())
    return f"{params.get('prompt', '')}\nNegative prompt: {params.get('negative_prompt', '')}\n{pairs}"


def save_png(image, path: Path, params: dict) -> Path:
    """Save a PIL image with ``params`` in the ``parameters`` and ``ldm_parameters`` text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("ldm_parameters", json.dumps(params, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info, compress_level=COMPRESS_LEVEL, optimize=False)
    return path


def read_parameters(path) -> dict:
    """The JSON parameters of a PNG written by :func:`save_png`."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["ldm_parameters"])
