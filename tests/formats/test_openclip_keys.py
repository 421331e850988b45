"""SD2 OpenCLIP text keys <-> transformers CLIPTextModel keys."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ldm.formats.openclip_keys import hf_to_openclip, openclip_num_layers, openclip_to_hf
from ldm.formats.safe_load import CheckpointError
from ldm.models.text_encoder import CLIPTextEncoder, to_hub_keys, to_module_keys

WIDTH, HEADS, LAYERS, VOCAB = 32, 4, 3, 64

pytestmark = pytest.mark.usefixtures("one_thread")



def tiny_openclip_like_model(layers=LAYERS, seed=0):
    """A tiny gelu CLIPTextModel (SD2 / OpenCLIP flavour) with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=layers,
                         num_attention_heads=HEADS, max_position_embeddings=16, hidden_act="gelu",
                         bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0)
    torch.manual_seed(seed)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def openclip_forward(sd, ids, layers):
    """Independent reference: OpenCLIP's text transformer built on nn.MultiheadAttention."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
        attn.load_state_dict({n: sd[p + "attn." + n] for n in names})
        h = F.layer_norm(x, (WIDTH,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = F.layer_norm(x, (WIDTH,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return F.layer_norm(x, (WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"])


@pytest.fixture(scope="module")
def model():
    return tiny_openclip_like_model()


def test_round_trip_and_layout(model):
    hub = to_hub_keys(model.state_dict())
    oc = hf_to_openclip(hub)
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * WIDTH, WIDTH)
    assert oc["positional_embedding"].shape == (16, WIDTH) and openclip_num_layers(oc) == LAYERS
    assert set(oc) >= {"token_embedding.weight", "ln_final.weight", "transformer.resblocks.2.mlp.c_proj.bias"}
    back = openclip_to_hf(oc)
    assert back.keys() == hub.keys() and all(torch.equal(back[k], hub[k]) for k in hub)
    # also accepts the flattened (transformers >= 5.6) key names
    assert hf_to_openclip(model.state_dict()).keys() == oc.keys()


def test_matches_diffusers_converter(model):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = "cond_stage_model.model."
    oc = hf_to_openclip(to_hub_keys(model.state_dict()))
    ckpt = {prefix + k: v for k, v in oc.items()}
    ckpt[prefix + "text_projection"] = torch.randn(WIDTH, WIDTH)
    ckpt[prefix + "logit_scale"] = torch.tensor(4.6)
    theirs = convert_open_clip_checkpoint(model, ckpt, prefix=prefix)
    theirs.pop("text_projection.weight", None)  # ignored for SD2 by diffusers too
    ours = openclip_to_hf({k[len(prefix):]: v for k, v in ckpt.items()})
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_outputs_match_openclip_reference(model):
    oc = hf_to_openclip(to_hub_keys(model.state_dict()))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = openclip_forward(oc, ids, LAYERS)
        got = model(ids).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # SD2: penultimate block + ln_final == a model without the last block
        penultimate = CLIPTextEncoder(model, tokenizer=None, penultimate=True).encode_ids(ids)
        torch.testing.assert_close(penultimate, openclip_forward(oc, ids, LAYERS - 1), rtol=1e-4, atol=1e-5)
        short = tiny_openclip_like_model(LAYERS - 1)
        short.load_state_dict(to_module_keys(openclip_to_hf(oc, num_layers=LAYERS - 1), short), strict=True)
        torch.testing.assert_close(short(ids).last_hidden_state, penultimate, rtol=1e-4, atol=1e-5)


def test_unknown_keys_are_errors():
    with pytest.raises(CheckpointError, match="unknown keys: transformer.resblocks.0.attn.weird"):
        openclip_to_hf({"transformer.resblocks.0.attn.weird": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no OpenCLIP name"):
        hf_to_openclip({"text_model.foo": torch.zeros(1)})
