"""Every weight format, reader and writer side by side, and the one safe builder of networks from stored configs.

    from ldm.formats import load_bundle, export
    bundle = load_bundle("model.safetensors")          # training .ckpt, ldm bundle, SD single file, diffusers
    export(bundle, "diffusers", "out/my-model")          # or "single-file", "ldm"
"""

from ldm.formats.bundle import ModelBundle
from ldm.formats.exporter import export
from ldm.formats.load import detect_source, load_bundle
from ldm.formats.safe_load import CheckpointError

__all__ = ["CheckpointError", "ModelBundle", "detect_source", "export", "load_bundle"]
