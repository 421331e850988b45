"""Evaluation of text-to-image models: FID / KID against validation images, CLIP score against prompts, the shapes
prompt accuracy (``metrics``), with feature extractors loaded from local files only (``extractors``); the
``python -m ldm.evaluate`` command (``ldm.cli.evaluate``) and the training callback (``ldm.training.callbacks.metrics``) share
them."""

from ldm.evaluation.extractors import MissingExtractorError, load_clip, load_inception
from ldm.evaluation.metrics import METRIC_NAMES, ImageMetrics, build_image_metrics, score_share

__all__ = ["METRIC_NAMES", "ImageMetrics", "MissingExtractorError", "build_image_metrics", "load_clip",
           "load_inception", "score_share"]
