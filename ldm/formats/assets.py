"""Weights shipped with ldm (``ldm/assets``), named ``builtin:<name>`` in configs."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN = "builtin:"
# The command that makes each shipped asset (see README, "The embedded default").
ASSET_RECIPES = {"shapes_vae": "python train.py experiment=shapes_vae  (then copy <run>/autoencoder.safetensors "
                               "to ldm/assets/shapes_vae.safetensors)"}


def resolve_weights(path: str | Path) -> Path:
    """A weights path, or ``builtin:<name>`` for a file shipped in ldm/assets."""
    text = str(path)
    if text.startswith(BUILTIN):
        name = text[len(BUILTIN):]
        resolved = ASSETS / f"{name}.safetensors"
        if not resolved.exists():
            recipe = ASSET_RECIPES.get(name, "")
            raise FileNotFoundError(f"built-in weights {name!r} are missing ({resolved}); make them with: {recipe}")
        return resolved
    resolved = Path(text).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"weights file not found: {resolved}")
    return resolved
