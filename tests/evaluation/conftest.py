"""Local stand-ins for the metrics' feature extractors (nothing is downloaded): torch-fidelity-layout Inception
weights from a random initialisation and a tiny CLIP model folder written with transformers' save_pretrained; plus
one tiny training run shared by the callback and command tests. (The small fixed feature map for the FID / KID math
is tests/helpers/evaluation.py's SmallExtractor.)"""

from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.evaluation.extractors import INCEPTION_FILE


def write_tiny_clip_model(folder: Path) -> Path:
    """A random CLIPModel (32-px images, the shapes vocabulary) + CLIPProcessor saved in transformers' layout."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from ldm.models import tiny_clip

    vocab = tiny_clip.write_tokenizer(folder)
    eos = vocab[tiny_clip.EOS]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab[tiny_clip.BOS],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer.from_pretrained(str(folder)))
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    return write_tiny_clip_model(tmp_path_factory.mktemp("clip-model"))


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's file name, holding a randomly initialised FID Inception (random BatchNorm statistics too)."""
    from ldm.evaluation.inception import FIDInceptionV3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FIDInceptionV3()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


METRICS_CALLBACK = ["+callbacks.metrics._target_=ldm.training.callbacks.metrics.ImageMetricsCallback",
                    "+callbacks.metrics.n_images=4", "+callbacks.metrics.sampler.steps=2", "+callbacks.metrics.batch_size=4",
                    "+callbacks.metrics.every_n_steps=0"]
CKPT = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"]


@pytest.fixture(scope="session")
def metrics_run(tmp_path_factory, clip_folder):
    """A 3-step tiny run with the metrics callback: CLIP score from the tiny folder, prompt accuracy, and FID / KID
    pointing at a missing Inception file. Returns (train result, the missing file, the log records)."""
    import logging

    from ldm.training.run.train import train
    from tests.helpers.training import TINY_MODEL, compose_train

    tmp = tmp_path_factory.mktemp("metrics-run")
    missing = tmp / "nowhere" / INCEPTION_FILE
    cfg = compose_train(tmp, TINY_MODEL + CKPT + METRICS_CALLBACK + [
        "data.val.resolution=16", f"+callbacks.metrics.inception_weights={missing}",
        f"+callbacks.metrics.clip_model={clip_folder}"])
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("ldm.training")
    logger.addHandler(handler)
    try:
        result = train(cfg)
    finally:
        logger.removeHandler(handler)
    return result, missing, records
