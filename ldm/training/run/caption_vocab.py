"""``model.text_encoder.words=captions``: the local tiny CLIP's tokenizer vocabulary built from the training
captions, so that every caption word (a glyph's class letter, "letter", a user's own words) is one token.

Resolved once, before anything is built (like ``auto_defaults``): the node's ``words`` becomes the plain list of
words (``ldm.models.tiny_clip.caption_words``: deterministic, most frequent first) and its ``folder`` gets a
sub-folder named by a digest of (preset, seed, words), so that two datasets never share a written tokenizer and the
checkpoint's stored config rebuilds exactly this tokenizer when sampling.
"""

from __future__ import annotations

import hashlib
import json

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

CAPTIONS = "captions"


def training_captions(cfg: DictConfig) -> list[str]:
    """The captions of ``data.train`` without decoding an image (an image folder's ``captions`` list)."""
    dataset = instantiate(cfg.data.train)
    captions = getattr(dataset, "captions", None)
    if captions is None:
        raise ValueError(f"model.text_encoder.words=captions: data.train ({type(dataset).__name__}) has no list of "
                         "captions to build a vocabulary from (image folders have one); set model.text_encoder.words "
                         "to a list of words instead")
    return [str(c) for c in captions]


def resolve_caption_vocab(cfg: DictConfig) -> list[str] | None:
    """Replace ``model.text_encoder.words: captions`` by the training captions' words; returns them (None: nothing
    to resolve)."""
    node = OmegaConf.select(cfg, "model.text_encoder")
    if node is None or OmegaConf.select(node, "words", default=None) != CAPTIONS:
        return None
    from ldm.models.tiny_clip import caption_words

    words = caption_words(training_captions(cfg))
    if not words:
        raise ValueError("model.text_encoder.words=captions: the training captions of data.train are all empty; "
                         "add captions (metadata.jsonl / .txt sidecars) or set model.text_encoder.words")
    key = json.dumps([node.get("preset", "tiny"), node.get("seed", 0), words])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    with open_dict(cfg):
        node.words = words
        if node.get("folder"):
            node.folder = f"{node.folder}/{digest}"
    n = sum(len(chunk.split()) for chunk in words)
    print(f"text encoder: tokenizer vocabulary of the {n} words of the training captions ({digest})")
    return words
