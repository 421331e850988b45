"""Export a trained model for other tools, and our own compact bundle.

    python -m ldm.export <checkpoint or model> --format {diffusers,single-file,ldm} --out <path>
        [--raw] [--dtype fp32|fp16|bf16] [--no-frozen] [--force] [--resolution N] [--text-encoder FOLDER]

- ``diffusers``: a ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/`` with the training schedule), safetensors weights;
- ``single-file``: an original-layout SD ``.safetensors`` plus its ``v1/v2-inference.yaml``-style config next to it
  (ComfyUI, A1111, diffusers' ``from_single_file``);
- ``ldm``: a folder ``load_ldm_bundle`` (and ``ldm.loading.load_bundle`` / ``sample.py``) rebuilds exactly.

The input is a training checkpoint (EMA U-Net unless ``--raw``) or anything ``ldm.loading.load_bundle`` reads.
"""

from ldm.export.core import DTYPES, FORMATS, ExportResult, export, load_source
from ldm.export.formats import (
    ExportError,
    diffusers_scheduler_config,
    model_index,
    original_config,
    write_diffusers,
    write_single_file,
)
from ldm.export.ldm_bundle import (
    BUNDLE_FILE,
    bundle_config,
    load_ldm_bundle,
    load_ldm_bundle_into,
    read_bundle_config,
    save_ldm_bundle,
)

__all__ = [
    "BUNDLE_FILE",
    "DTYPES",
    "FORMATS",
    "ExportError",
    "ExportResult",
    "bundle_config",
    "diffusers_scheduler_config",
    "export",
    "load_ldm_bundle",
    "load_ldm_bundle_into",
    "load_source",
    "model_index",
    "original_config",
    "read_bundle_config",
    "save_ldm_bundle",
    "write_diffusers",
    "write_single_file",
]
