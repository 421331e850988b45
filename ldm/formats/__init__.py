"""Every weight format, reader and writer side by side, and the one safe builder of networks from stored configs.

    from ldm.formats import load_bundle, export
    bundle = load_bundle("model.safetensors")          # training .ckpt, ldm bundle, SD single file, diffusers
    export(bundle, "diffusers", "out/my-model")          # or "single-file", "ldm"

The names are imported on first use, so that ``ldm.formats.safe_build`` (the stored-value checks, also used by
``ldm.data`` for latent-cache manifests) does not load every format.
"""

from importlib import import_module

_HOME = {"ModelBundle": "bundle", "CheckpointError": "safe_load", "load_bundle": "load", "detect_source": "detect",
         "export": "exporter"}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'ldm.formats' has no attribute {name!r}")
    return getattr(import_module(f"ldm.formats.{_HOME[name]}"), name)
