"""Per-dataset caption processing, in the order of kohya-ss/sd-scripts (``library/train_util.py``,
``BaseDataset.process_caption``):

1. prefix / suffix, joined with a space (kohya: ``caption_prefix + " " + caption``);
2. whole-caption dropout: that is ``module.p_uncond`` here (applied by the training module to the processed
   caption; dropping to "" at step 2 or after step 6 gives the same "");
3. wildcards ``{a|b|c}``: one option each, ``{{`` / ``}}`` are literal braces; a multi-line caption first becomes
   one of its lines (kohya does this only with wildcards on; without, a caption is used whole, as it was read);
4. split on ``separator``; the first ``keep_tokens`` tags (or, when ``keep_tokens_separator`` occurs in the
   caption, the part before it, and the part after a second one) stay fixed;
5. shuffle the other tags; 6. drop each of them with probability ``tag_dropout``; 7. rejoin with
   ``separator + " "`` (kohya always joins with ", ").

As in kohya, steps 4-7 run only when ``shuffle`` or ``tag_dropout`` is on (``keep_tokens`` alone changes nothing).

Randomness: each caption's draws come from a ``random.Random`` seeded with (seed, epoch, sample index), never
global state, so a run, a DataLoader worker or a resumed run sees the same captions for the same epoch and index.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch

_WILDCARD = re.compile(r"\{([^{}]*)\}")
_OPEN, _CLOSE = "\x00", "\x01"  # stand-ins for the escaped braces {{ and }} while the wildcards are replaced


@dataclass(frozen=True)
class CaptionProcessor:
    """The caption options of one dataset (config node ``data.train.captions``).

    prefix, suffix: added with a space before / after the caption (a trigger word: ``prefix: "sks,"``).
    wildcards: replace each ``{a|b}`` with one of its options (and pick one line of a multi-line caption).
    separator: what splits a caption into tags (",").
    keep_tokens: the first N tags stay in place (not shuffled, never dropped).
    keep_tokens_separator: when it occurs in a caption (e.g. "|||"), the tags before it stay fixed instead of the
        first keep_tokens, and those after a second occurrence stay fixed at the end.
    shuffle: shuffle the other tags; tag_dropout: drop each of them with this probability.
    extension: caption sidecar file extension of an image folder (".txt"; ".caption" for kohya datasets).
    seed: base seed of the per-sample randomness.
    """

    prefix: str = ""
    suffix: str = ""
    wildcards: bool = False
    separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    shuffle: bool = False
    tag_dropout: float = 0.0
    extension: str = ".txt"
    seed: int = 0

    def __post_init__(self):
        where = "data.train.captions"
        if not isinstance(self.separator, str) or not self.separator:
            raise ValueError(f"{where}.separator must be a non-empty string, got {self.separator!r}")
        if int(self.keep_tokens) < 0:
            raise ValueError(f"{where}.keep_tokens must be >= 0, got {self.keep_tokens!r}")
        if not 0.0 <= float(self.tag_dropout) <= 1.0:
            raise ValueError(f"{where}.tag_dropout must be in [0, 1], got {self.tag_dropout!r}")
        ext = str(self.extension)
        if not ext.strip(".") or "/" in ext:
            raise ValueError(f"{where}.extension must be a file extension like '.txt' or '.caption', got {ext!r}")
        object.__setattr__(self, "extension", ext if ext.startswith(".") else "." + ext)
        object.__setattr__(self, "keep_tokens", int(self.keep_tokens))
        object.__setattr__(self, "tag_dropout", float(self.tag_dropout))
        object.__setattr__(self, "seed", int(self.seed))

    @classmethod
    def of(cls, value: "CaptionProcessor | Mapping | None", where: str = "data.train.captions"
           ) -> "CaptionProcessor":
        """A processor from a config mapping (unknown keys named), an instance, or None (every option off)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping) and not hasattr(value, "items"):
            raise TypeError(f"{where} must be a mapping of caption options, got {type(value).__name__}")
        options = dict(value.items())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**options)

    @property
    def is_random(self) -> bool:
        """The processed caption changes with (epoch, index): its text context cannot be cached per image."""
        return self.wildcards or self.shuffle or self.tag_dropout > 0

    @property
    def is_identity(self) -> bool:
        return not self.is_random and not self.prefix and not self.suffix

    def cache_settings(self) -> dict[str, Any]:
        """What a cached caption depends on (part of the latent cache's key)."""
        return asdict(self)

    def __call__(self, caption: str, index: int | str, epoch: int = 0) -> str:
        """The processed caption of sample ``index`` in ``epoch``."""
        rng = random.Random(f"{self.seed}-{int(epoch)}-{index}")
        return process_caption(caption, self, rng)


def process_caption(caption: str, options: CaptionProcessor, rng: random.Random) -> str:
    """Steps 1 and 3-7 of the module docstring (kohya's ``process_caption`` order), drawing from ``rng``."""
    caption = add_prefix_suffix(caption, options.prefix, options.suffix)
    if options.wildcards:
        caption = expand_wildcards(caption, rng)
    if options.shuffle or options.tag_dropout > 0:
        fixed, flex, fixed_end = split_tags(caption, options.separator, options.keep_tokens,
                                            options.keep_tokens_separator)
        if options.shuffle:
            rng.shuffle(flex)
        flex = drop_tags(flex, options.tag_dropout, rng)
        caption = join_tags(fixed + flex + fixed_end, options.separator)
    return caption


def add_prefix_suffix(caption: str, prefix: str = "", suffix: str = "") -> str:
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    return caption


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """One line of a multi-line caption, then each ``{a|b|c}`` -> one option (``{{`` and ``}}`` stay braces)."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    caption = caption.replace("{{", _OPEN).replace("}}", _CLOSE)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(_OPEN, "{").replace(_CLOSE, "}")


def split_tags(caption: str, separator: str = ",", keep_tokens: int = 0, keep_tokens_separator: str = ""
               ) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, tags to shuffle / drop, fixed tail). With ``keep_tokens_separator`` in the caption the head is
    what precedes it and the tail what follows a second one (empty tags removed); else the head is the first
    ``keep_tokens`` tags (kohya keeps empty tags in this case)."""
    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(separator) if t.strip()]

    if keep_tokens_separator and keep_tokens_separator in caption:
        head, rest = caption.split(keep_tokens_separator, 1)
        tail = ""
        if keep_tokens_separator in rest:
            rest, tail = rest.split(keep_tokens_separator, 1)
        return tags(head), tags(rest), tags(tail)
    all_tags = [t.strip() for t in caption.strip().split(separator)]
    return all_tags[:keep_tokens], all_tags[keep_tokens:], []


def drop_tags(tags: list[str], rate: float, rng: random.Random) -> list[str]:
    """Each tag kept with probability 1 - rate (one draw per tag, in order)."""
    if rate <= 0:
        return list(tags)
    return [t for t in tags if rng.random() >= rate]


def join_tags(tags: list[str], separator: str = ",") -> str:
    joiner = separator + " " if separator.strip() else separator
    return joiner.join(tags)


def caption_cache_fields(plain, settings: dict) -> dict:
    """The latent cache's view of a dataset's caption options (``plain``: the dataset copy the cache is built from;
    ``settings``: the cache key, completed here).

    Deterministic options (prefix / suffix) are applied when the cache is built, so cached text contexts are those
    of the processed caption, and they are part of the key. Random ones (wildcards, shuffle, tag dropout) cannot be
    cached per image: ``plain`` then gives the captions as read, and the returned ``captions`` field makes the
    cache's view apply the options on read, per (seed, epoch, index); training encodes those captions each step
    (the text encoder's ``cache_size`` memoises contexts per processed caption string)."""
    options = plain.caption_options
    if options.is_identity:
        return {}
    settings["captions"] = options.cache_settings()
    if not options.is_random:
        return {}
    plain.caption_options = CaptionProcessor(extension=options.extension)
    return {"captions": options}


class SharedEpoch:
    """The epoch a dataset serves, in shared memory: persistent DataLoader workers keep their copy of the dataset
    yet must see ``set_epoch`` (as ``ldm.data.webdataset`` does for its shards)."""

    def __init__(self):
        self._value = torch.zeros((), dtype=torch.int64).share_memory_()

    def get(self) -> int:
        return int(self._value)

    def set(self, epoch: int) -> None:
        self._value.fill_(int(epoch))
