"""The tiny CLIP's vocabulary built from a dataset's captions (experiment=own_data): deterministic, every caption
word one token, stored as bounded chunks, and a folder written for other words is refused, not reused."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.models.text_encoder import CLIPTextEncoder  # noqa: E402
from ldm.models.tiny_clip import BOS, EOS, caption_words  # noqa: E402

CAPTIONS = ["the letter K", "a drawing of the letter W", "Letter K in dark ink on white paper", "a printed letter X",
            "the letter K"]


def test_words_are_deterministic_most_frequent_first():
    words = caption_words(CAPTIONS)
    assert words == caption_words(list(reversed(CAPTIONS)))  # the data's order does not matter
    flat = " ".join(words).split()
    assert flat[:3] == ["letter", "k", "the"]  # 5 x letter, 3 x k, 3 x the (ties: alphabetical)
    assert len(flat) == len(set(flat)) and "paper" in flat and "Letter" not in flat


def test_words_come_in_bounded_chunks_and_can_be_capped():
    letters = "abcdefghijklmnopqrstuvwxyz"
    captions = [f"w{letters[i // 26]}{letters[i % 26]}" for i in range(300)] + ["x" * 100]  # 100 letters: skipped
    chunks = caption_words(captions, chunk_chars=50)
    assert all(len(c) <= 50 for c in chunks) and len(chunks) > 1
    assert "x" * 100 not in " ".join(chunks).split()
    assert len(" ".join(caption_words(captions, max_words=3)).split()) == 3


def test_every_caption_word_is_one_token(tmp_path):
    enc = CLIPTextEncoder.from_tiny(folder=tmp_path / "clip", words=caption_words(CAPTIONS))
    vocab = enc.tokenizer.get_vocab()
    ids = enc.tokenize(["a drawing of the letter K"])[0].tolist()
    words = ["a", "drawing", "of", "the", "letter", "k"]
    assert ids[:8] == [vocab[BOS]] + [vocab[w + "</w>"] for w in words] + [vocab[EOS]]
    shapes = CLIPTextEncoder.from_tiny(folder=tmp_path / "shapes")  # the shapes vocabulary: "letter" in bytes
    assert (shapes.tokenize(["the letter K"])[0] != vocab[EOS]).sum() > 4


def test_a_folder_of_other_words_is_refused(tmp_path):
    CLIPTextEncoder.from_tiny(folder=tmp_path / "clip", words=caption_words(CAPTIONS))
    with pytest.raises(ValueError, match="model.text_encoder.folder"):
        CLIPTextEncoder.from_tiny(folder=tmp_path / "clip", words=caption_words(["a red circle"]))
    with pytest.raises(ValueError, match="model.text_encoder.words='captions'"):
        CLIPTextEncoder.from_tiny(folder=tmp_path / "other", words="captions")


def test_a_trainable_encoder_caches_nothing(tmp_path):
    enc = CLIPTextEncoder.from_tiny(folder=tmp_path / "clip", frozen=False, cache_size=8)
    assert all(p.requires_grad for p in enc.parameters())
    before = enc.empty_context(1)
    enc([CAPTIONS[0]])
    assert not enc._contexts and not enc._empty
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1)
    assert not torch.allclose(enc.empty_context(1), before)  # new weights, new empty-prompt context
