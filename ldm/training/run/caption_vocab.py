"""``model.text_encoder.words=captions``: the local tiny CLIP's tokenizer vocabulary built from the training
captions, so that every caption word (a glyph's class letter, "letter", a user's own words) is one token.

Resolved once, before anything is built (like ``auto_defaults``): the node's ``words`` becomes the plain list of
words (``ldm.models.tiny_clip.caption_words``: deterministic, most frequent first) and its ``folder`` gets a
sub-folder named by a digest of (preset, seed, words), so that two datasets never share a written tokenizer and the
checkpoint's stored config rebuilds exactly this tokenizer when sampling.

``words: auto`` and ``frozen: auto`` (data=folder / hf / webdataset, data/fit/auto.yaml; ``choose_text_encoder``):
the tiny local CLIP of a run from scratch gets the captions' words (the default words for a stream that does not
list its captions) and trains with the U-Net; any other text encoder keeps its own words and its ``frozen``.
"""

from __future__ import annotations

import hashlib
import json

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.training.run.auto_defaults import AUTO, from_scratch, stored_model_node

CAPTIONS = "captions"
TINY_CLIP = "ldm.models.text_encoder.CLIPTextEncoder.from_tiny"  # the tiny local CLIP (model=shapes'), from scratch


def training_captions(cfg: DictConfig) -> list[str]:
    """The captions of ``data.train`` without decoding an image (an image folder's ``captions`` list)."""
    dataset = instantiate(cfg.data.train)
    captions = getattr(dataset, "captions", None)
    if captions is None:
        raise ValueError(f"model.text_encoder.words=captions: data.train ({type(dataset).__name__}) has no list of "
                         "captions to build a vocabulary from (image folders have one); set model.text_encoder.words "
                         "to a list of words instead")
    return [str(c) for c in captions]


def resolve_caption_vocab(cfg: DictConfig, quiet: bool = False, captions: list[str] | None = None) -> list[str] | None:
    """Replace ``model.text_encoder.words: captions`` by the training captions' words (``captions``: those already
    read); returns them (None: nothing to resolve). Says so unless ``quiet`` (``choose_text_encoder`` says it in
    train()'s block of choices)."""
    node = OmegaConf.select(cfg, "model.text_encoder")
    if node is None or OmegaConf.select(node, "words", default=None) != CAPTIONS:
        return None
    from ldm.models.tiny_clip import caption_words

    words = caption_words(training_captions(cfg) if captions is None else captions)
    if not words:
        raise ValueError("model.text_encoder.words=captions: the training captions of data.train are all empty; "
                         "add captions (metadata.jsonl / .txt sidecars) or set model.text_encoder.words")
    digest = set_words(node, words)
    if not quiet:
        print(f"text encoder: tokenizer vocabulary of the {word_count(words)} words of the training captions "
              f"({digest})")
    return words


def set_words(node: DictConfig, words: list[str]) -> str:
    """``words`` into the text encoder node, its ``folder`` a sub-folder named by the digest of (preset, seed,
    words): two vocabularies never share a written tokenizer. Returns the digest."""
    key = json.dumps([node.get("preset", "tiny"), node.get("seed", 0), list(words)])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    with open_dict(node):
        node.words = list(words)
        if node.get("folder"):
            node.folder = f"{node.folder}/{digest}"
    return digest


def word_count(words: list[str]) -> int:
    """The words in ``caption_words``' chunks."""
    return sum(len(chunk.split()) for chunk in words)


def choose_text_encoder(cfg: DictConfig) -> str | None:
    """``model.text_encoder.words`` / ``frozen`` = auto -> values (see the module's doc); returns the line that says
    what was chosen and why (None: nothing was auto)."""
    node = OmegaConf.select(cfg, "model.text_encoder")
    auto = [k for k in ("words", "frozen") if node is not None and OmegaConf.select(node, k, default=None) == AUTO]
    if not auto:
        return None
    if node.get("_target_") != TINY_CLIP or not from_scratch(cfg):
        reason = "a pretrained model or an adapter" if node.get("_target_") == TINY_CLIP else "not the tiny local CLIP"
        name = ".".join(str(node.get("_target_")).split(".")[-2:])
        return f"text encoder: {name}, {own_text_encoder(cfg)} ({reason})"
    vocabulary = _caption_words_or_default(cfg, node) if "words" in auto else "the words of model.text_encoder.words"
    if "frozen" in auto:
        with open_dict(node):
            node.frozen = False
    trained = "frozen (model.text_encoder.frozen)" if node.get("frozen", True) else "trained with the U-Net"
    return f"text encoder: tiny local CLIP -> {vocabulary}, {trained}"


def own_text_encoder(cfg: DictConfig) -> str:
    """``words`` / ``frozen`` = auto without the data: the words of the text encoder stored in ``model.pretrained``
    (one of our runs: a base trained with its captions' words) or the encoder's own, and its frozen default.
    Returns what that is."""
    node = cfg.model.text_encoder
    stored = stored_model_node(cfg, "text_encoder") or {}
    with open_dict(node):
        if node.get("frozen") == AUTO:
            node.pop("frozen")
        if node.get("words") != AUTO:
            return "its given words, frozen unless set"
        node.pop("words")
    if isinstance(stored.get("words"), list) and stored.get("_target_") == node.get("_target_") == TINY_CLIP:
        set_words(node, stored["words"])
        return f"the words of the text encoder in model.pretrained ({word_count(stored['words'])}), frozen unless set"
    return "its own words, frozen unless set"


def _caption_words_or_default(cfg: DictConfig, node: DictConfig) -> str:
    """words: auto -> the captions' words (resolved now), or the default words when data.train lists no captions
    (a stream); says which."""
    from ldm.models.tiny_clip import caption_words

    dataset = instantiate(cfg.data.train)
    captions = getattr(dataset, "captions", None)
    with open_dict(node):
        if captions is None or not caption_words([str(c) for c in captions]):
            node.pop("words")
            why = (f"{type(dataset).__name__} lists no captions up front" if captions is None
                   else "the training captions are all empty")
            return f"the default vocabulary ({why}; model.text_encoder.words=[...] sets one)"
        node.words = CAPTIONS
    words = resolve_caption_vocab(cfg, quiet=True, captions=[str(c) for c in captions])
    return f"vocabulary from your captions ({word_count(words)} words)"
