"""CLIPTextEncoder and the local tiny CLIP writer (no downloads)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.models.text_encoder import CLIPTextEncoder, clip_text_config  # noqa: E402
from ldm.models.tiny_clip import BOS, DEFAULT_WORDS, EOS, build_vocab, bpe, word_symbols, write_tiny_clip  # noqa: E402

CAPTION = "a red circle on a white background"

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def encoder(folder):
    return CLIPTextEncoder.from_pretrained(folder)


def test_folder_layout_and_determinism(folder, tmp_path):
    names = ["tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
             "tokenizer/special_tokens_map.json", "text_encoder/config.json", "text_encoder/model.safetensors"]
    again = write_tiny_clip(tmp_path / "again")
    for name in names:
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name
    other = write_tiny_clip(tmp_path / "other", seed=1)
    assert (other / names[-1]).read_bytes() != (folder / names[-1]).read_bytes()


def test_vocab_makes_words_single_tokens():
    vocab, merges = build_vocab(["at cat hat", "circle", "background"])
    ranks = {m: i for i, m in enumerate(merges)}
    for word in ["at", "cat", "hat", "circle", "background"]:
        assert bpe(word_symbols(word), ranks) == [word + "</w>"]
    assert list(vocab)[-2:] == [BOS, EOS]
    assert len(vocab) == 512 + len(set(a + b for a, b in merges)) + 2


def test_tokenize_pads_and_truncates(encoder):
    ids = encoder.tokenize([CAPTION, "zebra " * 200])
    assert ids.shape == (2, 77)
    tok = encoder.tokenizer
    words = tok.convert_ids_to_tokens(ids[0, :9].tolist())
    assert words == [BOS] + [w + "</w>" for w in CAPTION.split()] + [EOS]
    assert (ids[0, 9:] == tok.pad_token_id).all()
    assert ids[1, 0] == tok.bos_token_id and ids[1, -1] == tok.eos_token_id


def test_forward_matches_transformers(encoder, folder):
    from transformers import CLIPTextModel

    ref = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    prompts = [CAPTION, "two blue squares"]
    ctx = encoder(prompts)
    assert ctx.shape == (2, 77, encoder.context_dim) and encoder.context_dim == 32
    with torch.no_grad():
        want = ref(encoder.tokenize(prompts)).last_hidden_state
    torch.testing.assert_close(ctx, want, rtol=0, atol=0)


def test_penultimate_uses_final_norm(encoder):
    enc2 = CLIPTextEncoder(encoder.model, encoder.tokenizer, penultimate=True)
    ids = encoder.tokenize([CAPTION])
    with torch.no_grad():
        hidden = encoder.model(ids, output_hidden_states=True).hidden_states
        want = encoder.model.final_layer_norm(hidden[-2])
    torch.testing.assert_close(enc2([CAPTION]), want)
    assert not torch.allclose(enc2([CAPTION]), encoder([CAPTION]))


def test_frozen(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training
    with torch.enable_grad():
        assert not encoder([CAPTION]).requires_grad


def test_empty_context_cached_and_invalidated(folder):
    enc = CLIPTextEncoder.from_pretrained(folder)
    empty = enc.empty_context(3)
    assert empty.shape == (3, 77, 32)
    torch.testing.assert_close(empty[1:2], enc([""]))
    assert enc.empty_context(1).data_ptr() == empty.data_ptr()  # cached
    old = empty[:1].clone()
    state = {k: v + 1 if "final_layer_norm.bias" in k else v for k, v in enc.model.state_dict().items()}
    enc.model.load_state_dict(state)
    torch.testing.assert_close(enc.empty_context(1), enc([""]))
    torch.testing.assert_close(enc.empty_context(1), old + 1)


def test_presets():
    sd15, sd21, tiny = clip_text_config("sd15"), clip_text_config("sd21"), clip_text_config("tiny")
    assert (sd15.hidden_size, sd15.num_hidden_layers, sd15.hidden_act) == (768, 12, "quick_gelu")
    assert (sd21.hidden_size, sd21.num_hidden_layers, sd21.num_attention_heads, sd21.hidden_act) == (
        1024, 23, 16, "gelu")
    assert sd15.vocab_size == sd21.vocab_size == 49408
    vocab, _ = build_vocab(DEFAULT_WORDS)
    assert tiny.vocab_size == len(vocab) and tiny.hidden_size == 32
    assert clip_text_config("small").hidden_size == 128
    with pytest.raises(ValueError):
        clip_text_config("nope")


def test_from_tiny_reuses_folder(folder):
    enc = CLIPTextEncoder.from_tiny(folder=folder)
    assert enc.context_dim == 32 and not enc.penultimate


def test_context_cache_matches_encoding_each_prompt_alone(folder, encoder):
    cached = CLIPTextEncoder.from_pretrained(folder, cache_size=2)
    prompts = [CAPTION, "a blue square on a black background", CAPTION, ""]
    out = cached(prompts)
    for prompt, row in zip(prompts, out):
        torch.testing.assert_close(row, encoder([prompt])[0], atol=0, rtol=0)
    assert len(cached._contexts) == 2, "least recently used prompts leave a full cache"
    assert [k[0] for k in cached._contexts] == [CAPTION, ""]


def test_context_cache_is_cleared_by_new_weights(folder):
    cached = CLIPTextEncoder.from_pretrained(folder, cache_size=8)
    before = cached([CAPTION])
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in cached.model.state_dict().items()}
    cached.model.load_state_dict(state)
    assert not cached._contexts
    assert not torch.allclose(cached([CAPTION]), before)


def test_context_cache_size_must_not_be_negative(folder):
    with pytest.raises(ValueError, match="cache_size"):
        CLIPTextEncoder.from_pretrained(folder, cache_size=-1)


# ------------------------------------------------------------------------------------ long prompts (max_chunks)

WORDS = "a red green blue circle square triangle star on white black background".split()


def long_prompt(n_tokens: int) -> str:
    """n_tokens words, each a single token of the tiny vocab."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_tokens))


def reference_chunks(folder, prompt: str, chunks: int) -> torch.Tensor:
    """A1111's layout computed here from the vocab, without the encoder's tokenizer code: 75 tokens a chunk, each
    BOS + tokens + EOS, padded with EOS (SD1's pad); chunks beyond the prompt are empty (BOS EOS EOS ...); every
    chunk through transformers' CLIPTextModel alone, concatenated along the sequence."""
    import json

    from transformers import CLIPTextModel

    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    bos, eos = vocab[BOS], vocab[EOS]
    ids = [vocab[w + "</w>"] for w in prompt.split()]
    pieces = [ids[i:i + 75] for i in range(0, 75 * chunks, 75)]
    rows = [[bos] + p + [eos] * (76 - len(p)) for p in pieces]
    ref = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    with torch.no_grad():
        return torch.cat([ref(torch.tensor([row])).last_hidden_state for row in rows], dim=1)[0]


def test_long_prompt_context_is_the_chunked_encoding(folder):
    enc = CLIPTextEncoder.from_pretrained(folder, max_chunks=3)
    p150, p160 = long_prompt(150), long_prompt(160)
    ctx = enc([p150, p160, CAPTION])
    assert ctx.shape == (3, 3 * 77, 32)  # the batch is padded to its longest prompt: 160 tokens -> 3 chunks
    torch.testing.assert_close(ctx[0], reference_chunks(folder, p150, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(ctx[1], reference_chunks(folder, p160, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(ctx[2], reference_chunks(folder, CAPTION, 3), atol=1e-6, rtol=0)
    alone = enc([p150])
    assert alone.shape == (1, 2 * 77, 32)
    torch.testing.assert_close(alone[0], reference_chunks(folder, p150, 2), atol=1e-6, rtol=0)
    # the padding chunks are the empty prompt's context: what CFG and caption dropout use
    torch.testing.assert_close(ctx[0, 154:], enc.empty_context(1)[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(enc([""]), enc.empty_context(1), atol=0, rtol=0)
    torch.testing.assert_close(enc.pad_context(alone, 231), ctx[:1], atol=1e-6, rtol=0)
    assert enc.empty_context(2, chunks=3).shape == (2, 231, 32)
    with pytest.raises(ValueError, match="whole chunks"):
        enc.pad_context(alone, 200)


def test_one_chunk_is_unchanged_and_matches_the_tokenizer(folder, encoder):
    long = long_prompt(150)
    assert encoder.max_chunks == 1
    torch.testing.assert_close(encoder([long]), reference_chunks(folder, long, 1)[None], atol=1e-6, rtol=0)
    chunked = CLIPTextEncoder.from_pretrained(folder, max_chunks=4)
    for prompt in (CAPTION, "", long_prompt(75)):
        assert torch.equal(chunked.chunk_ids([prompt])[:, 0], encoder.tokenize([prompt])), prompt
    # SD2's tokenizer pads with "!" (id 0), not EOS: a chunk is laid out as the tokenizer lays out 77 tokens
    from transformers import CLIPTokenizer

    sd2_like = CLIPTokenizer.from_pretrained(folder / "tokenizer", pad_token="!")
    assert sd2_like.pad_token_id != sd2_like.eos_token_id
    a = CLIPTextEncoder(encoder.model, sd2_like, max_chunks=2)
    b = CLIPTextEncoder(encoder.model, sd2_like)
    assert torch.equal(a.chunk_ids([CAPTION])[:, 0], b.tokenize([CAPTION]))
    rest = " ".join(long_prompt(80).split()[75:])  # the 5 tokens of the second chunk
    assert torch.equal(a.chunk_ids([long_prompt(80)])[0, 1], b.tokenize([rest])[0])
    assert torch.equal(a.chunk_ids([long_prompt(80), CAPTION])[1, 1], b.tokenize([""])[0])  # an empty chunk


def test_prompt_beyond_max_chunks_is_cut_with_a_warning(folder, caplog):
    enc = CLIPTextEncoder.from_pretrained(folder, max_chunks=2)
    with caplog.at_level("WARNING", logger="ldm.models"):
        ctx = enc([long_prompt(200)])
    assert ctx.shape == (1, 154, 32)
    assert "model.text_encoder.max_chunks=2" in caplog.text and "200 tokens cut to 150" in caplog.text
    torch.testing.assert_close(ctx, enc([long_prompt(150)]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="model.text_encoder.max_chunks"):
        CLIPTextEncoder.from_pretrained(folder, max_chunks=0)


def test_context_cache_pads_long_prompts_like_the_plain_path(folder):
    plain = CLIPTextEncoder.from_pretrained(folder, max_chunks=3)
    cached = CLIPTextEncoder.from_pretrained(folder, max_chunks=3, cache_size=8)
    prompts = [CAPTION, long_prompt(160), "", long_prompt(90)]
    torch.testing.assert_close(cached(prompts), plain(prompts), atol=1e-6, rtol=0)
