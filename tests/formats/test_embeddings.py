"""Textual-inversion embedding files: what we write loads with diffusers' load_textual_inversion and gives the same
text-encoder output as ours (1 and 3 vectors); every layout A1111 / ComfyUI / diffusers write reads back; bad
files fail with the file named."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from ldm.formats.embeddings import load_embedding_files, read_embedding, save_embedding
from ldm.formats.exporter import export
from ldm.formats.load import load_bundle
from ldm.formats.safe_load import CheckpointError
from ldm.models.text_encoder import CLIPTextEncoder
from tests.helpers.sample import model  # noqa: F401 - the tiny SD single file + tiny CLIP fixture

DIM = 32  # the tiny CLIP's width


def vectors(n, seed=0):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def diffusers_folder(model, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "diffusers"
    export(model[0], "diffusers", out, text_encoder=model[1], log=lambda _m: None)
    return out


@pytest.mark.parametrize("n", [1, 3])
def test_our_file_loads_in_diffusers_with_the_same_text_encoder_output(diffusers_folder, tmp_path, n):
    diffusers = pytest.importorskip("diffusers")
    token = "<cat-toy>"
    emb = save_embedding(tmp_path / "learned_embeds.safetensors", token, vectors(n))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_folder, safety_checker=None,
                                                             local_files_only=True)
    pipe.load_textual_inversion(str(emb))
    ours = load_bundle(diffusers_folder).text_encoder
    base_vocab = len(ours.tokenizer)
    loaded = load_embedding_files(ours, [str(emb)], report=lambda _m: None)
    assert loaded[0].token == token and loaded[0].layout == "diffusers"
    prompts = ["a <cat-toy> circle on a white background", "a red <cat-toy>", "no placeholder here"]
    for prompt in prompts:
        theirs_ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length",
                                    max_length=pipe.tokenizer.model_max_length, truncation=True,
                                    return_tensors="pt").input_ids
        ids = ours.tokenize([prompt])
        assert torch.equal(ids, theirs_ids), prompt  # the multi-vector expansion is diffusers'
        with torch.no_grad():
            theirs = pipe.text_encoder(theirs_ids).last_hidden_state
            torch.testing.assert_close(ours.encode_ids(ids), theirs, atol=1e-5, rtol=1e-5)
    assert int((ours.tokenize(prompts[:1]) >= base_vocab).sum()) == n  # <cat-toy> became its n tokens
    with torch.no_grad():  # the token changes the output (the embedding is in use, not ignored)
        plain = ours(["a circle on a white background"])
        assert (ours([prompts[0]]) - plain).abs().max() > 1e-3


def test_a1111_layout_loads_in_diffusers_as_a_single_tensor_dict(diffusers_folder, tmp_path):
    """Our A1111 / ComfyUI file is a one-key dict: diffusers reads it too, with token= (as it does the kohya files)."""
    diffusers = pytest.importorskip("diffusers")
    v = vectors(2, seed=3)
    path = save_embedding(tmp_path / "shiny.safetensors", "<shiny>", v, layout="a1111")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_folder, safety_checker=None,
                                                             local_files_only=True)
    pipe.load_textual_inversion(str(path), token="shiny")
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["shiny", "shiny_1"])
    torch.testing.assert_close(table[ids], v)
    read = read_embedding(path)
    assert read.token == "shiny" and read.layout == "emb_params"
    torch.testing.assert_close(read.vectors, v)


def test_every_layout_reads(tmp_path):
    v = vectors(2)
    save_file({"<tok>": v}, str(tmp_path / "d.safetensors"))
    save_file({"emb_params": v}, str(tmp_path / "kohya_style.safetensors"))
    save_file({"string_to_param.*": v}, str(tmp_path / "a1111.safetensors"))
    save_file({"clip_l": v, "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "sdxl.safetensors"))
    save_file({"emb_params": v[0]}, str(tmp_path / "one_d.safetensors"))  # a bare [dim] vector
    torch.save({"string_to_param": {"*": v}, "string_to_token": {"*": 265}, "name": "old", "step": 500},
               tmp_path / "a1111_old.pt")
    torch.save(v, tmp_path / "bare.pt")
    cases = {"d.safetensors": ("<tok>", "diffusers"), "kohya_style.safetensors": ("kohya_style", "emb_params"),
             "a1111.safetensors": ("a1111", "string_to_param"), "sdxl.safetensors": ("sdxl", "clip_l"),
             "a1111_old.pt": ("a1111_old", "string_to_param"), "bare.pt": ("bare", "tensor")}
    for name, (token, layout) in cases.items():
        e = read_embedding(tmp_path / name, dim=DIM)
        assert (e.token, e.layout) == (token, layout), name
        torch.testing.assert_close(e.vectors, v)
    one = read_embedding(tmp_path / "one_d.safetensors")
    assert one.vectors.shape == (1, DIM)
    assert read_embedding(tmp_path / "d.safetensors", token="<mine>").token == "<mine>"  # FILE:TOKEN wins


def test_bad_files_name_the_file(tmp_path):
    save_file({"a": vectors(1), "b": vectors(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match=r"two\.safetensors.*unknown embedding layout.*a, b"):
        read_embedding(tmp_path / "two.safetensors")
    save_embedding(tmp_path / "wide.safetensors", "<w>", torch.zeros(1, 768))
    with pytest.raises(CheckpointError, match=r"wide\.safetensors.*768 dims.*32"):
        read_embedding(tmp_path / "wide.safetensors", dim=DIM)
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match=r"xl\.safetensors.*SDXL"):
        read_embedding(tmp_path / "xl.safetensors", dim=DIM)
    save_file({"<n>": torch.full((1, DIM), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="nan.safetensors.*NaN"):
        read_embedding(tmp_path / "nan.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_embedding(tmp_path / "cut.safetensors")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}))
    with pytest.raises(CheckpointError, match="evil.pt.*data-only"):
        read_embedding(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_embedding(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors only"):
        save_embedding(tmp_path / "x.pt", "<x>", vectors(1))


def test_loading_into_the_tiny_clip_and_name_clashes(tmp_path):
    encoder = CLIPTextEncoder.from_tiny("tiny", folder=tmp_path / "clip", cache_size=8)
    before = encoder(["a red circle"]).clone()  # cached: adding tokens must not leave stale contexts
    table = encoder.model.get_input_embeddings().weight.detach().clone()
    a = save_embedding(tmp_path / "a.safetensors", "<a>", vectors(3, seed=1))
    b = save_embedding(tmp_path / "b.safetensors", "blue", vectors(1, seed=2), layout="a1111")
    load_embedding_files(encoder, [str(a), f"{b}:<bee>"], report=lambda _m: None)
    new = encoder.model.get_input_embeddings().weight
    assert new.shape[0] == table.shape[0] + 4 and torch.equal(new[:table.shape[0]], table)
    torch.testing.assert_close(new[table.shape[0]:table.shape[0] + 3], vectors(3, seed=1))
    assert torch.equal(encoder(["a red circle"]), before)
    assert encoder.tokenizer.tokenize(encoder.tokenizer.decode(encoder.tokenize("<a> <bee>")[0][1:5])) == \
        ["<a>", "<a>_1", "<a>_2", "<bee>"]
    encoder.max_chunks = 2  # long prompts (chunks of 75 tokens) expand the placeholder as well
    assert int((encoder.chunk_ids(["<a> circle"]) >= table.shape[0]).sum()) == 3
    with pytest.raises(CheckpointError, match=r"a\.safetensors.*already in the tokenizer"):
        load_embedding_files(encoder, [str(a)], report=lambda _m: None)
    with pytest.raises(CheckpointError, match="same token"):
        load_embedding_files(encoder, [f"{a}:<z>", f"{b}:<z>"], report=lambda _m: None)
