"""Feature extractors of the metrics, loaded from local files only (nothing is downloaded).

- FID / KID: the Inception-v3 weight file torch-fidelity and torchmetrics use,
  ``weights-inception-2015-12-05-6726825d.pth`` (see :mod:`ldm.evaluation.inception`).
- CLIP score: a CLIP model folder in transformers' layout (``config.json``, the weights, the tokenizer files and
  ``preprocessor_config.json``), as written by ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained``
  or downloaded with ``huggingface-cli download openai/clip-vit-base-patch16 --local-dir <folder>``.

A missing or unreadable file raises :class:`MissingExtractorError`, whose message names the file, where to get
it and the config key to set; callers turn it into a warning and go on without that metric.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
CLIP_DEFAULT = "openai/clip-vit-base-patch16"
CLIP_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json")
CLIP_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4 / 5 names


class MissingExtractorError(FileNotFoundError):
    """A metric's feature extractor is not available locally; the message says what to provide and where."""


def inception_hint(key: str) -> str:
    return (f"provide torch-fidelity's Inception weights {INCEPTION_FILE} (download it from {INCEPTION_URL}) "
            f"and set {key}=<path to the file>")


def load_inception(path, key: str = "inception_weights") -> nn.Module:
    """The FID Inception-v3 with the weights in ``path``; ``key`` is the config key named in error messages."""
    from ldm.evaluation.inception import FIDInceptionV3

    if path is None or not str(path).strip():
        raise MissingExtractorError(f"no Inception weights configured ({key} is not set): {inception_hint(key)}")
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / INCEPTION_FILE
    if not file.is_file():
        raise MissingExtractorError(f"Inception weights not found: {file}; {inception_hint(key)}")
    model = FIDInceptionV3()
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - unpickling / key / shape errors all mean "wrong file"
        raise MissingExtractorError(f"{file} is not torch-fidelity's Inception weight file ({type(err).__name__}: "
                                    f"{str(err)[:300]}); {inception_hint(key)}") from err
    return model.eval()


def clip_hint(key: str) -> str:
    return (f"provide a CLIP model folder in transformers' layout (config.json, model.safetensors, tokenizer files, "
            f"preprocessor_config.json), e.g. `huggingface-cli download {CLIP_DEFAULT} --local-dir <folder>` or "
            f"CLIPModel/CLIPProcessor.from_pretrained(...).save_pretrained(<folder>), and set {key}=<folder>")


class CLIPFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as
    tensors, as torchmetrics' CLIPScore expects (transformers 5 returns an output object instead)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _embeddings(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values, **kwargs):
        return self._embeddings(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(self, input_ids, attention_mask=None, **kwargs):
        return self._embeddings(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                                             **kwargs))


def load_clip(folder, key: str = "clip_model"):
    """(CLIP model, CLIPProcessor) from a local folder, in eval mode; ``key`` is named in error messages. The
    model is wrapped in :class:`CLIPFeatures`, ready for torchmetrics' CLIPScore."""
    if folder is None or not str(folder).strip():
        raise MissingExtractorError(f"no CLIP model configured ({key} is not set): {clip_hint(key)}")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise MissingExtractorError(f"CLIP model folder not found: {path}; {clip_hint(key)}")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    for choices in (CLIP_WEIGHT_FILES, CLIP_PROCESSOR_FILES):
        if not any((path / name).is_file() for name in choices):
            missing.append(" or ".join(choices[:2]))
    if missing:
        raise MissingExtractorError(f"CLIP model folder {path} lacks {', '.join(missing)}; {clip_hint(key)}")
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError / ValueError / KeyError ...
        raise MissingExtractorError(f"cannot load a CLIP model from {path} ({type(err).__name__}: "
                                    f"{str(err)[:300]}); {clip_hint(key)}") from err
    return CLIPFeatures(model.eval().requires_grad_(False)), processor
