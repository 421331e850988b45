"""LoHa, LoKr and DoRA files: ours load in LyCORIS (its kohya loader, `lycoris.kohya.create_network_from_weights`, on
diffusers' U-Net and transformers' CLIP) and in diffusers (PEFT-layout DoRA, `load_lora_weights`) with the outputs we
compute; LyCORIS's own files load in ldm with its outputs; every key we write is one ComfyUI's loader consumes.
Outputs agree within 1e-5 (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.formats.lora_files import apply_lora_files, read_lora_file, save_lora_file
from ldm.models.lora import LoRANetwork, adapter_kind
from tests.helpers.lora import bundle, diffusers_with, inputs, ours_with, pipe, roots  # noqa: F401 - fixtures
from tests.helpers.lora import trained as random_network

diffusers = pytest.importorskip("diffusers")
lycoris = pytest.importorskip("lycoris")

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(atol=1e-5, rtol=1e-5)
KINDS = ("loha", "lokr", "dora")


def trained(bundle, type, preset="full", seed=3, **cfg) -> LoRANetwork:
    """A network as after training: every parameter random (a fresh one adds nothing)."""
    return random_network(bundle, seed, scale=0.2, type=type, preset=preset, rank=2, alpha=3.0, conv_rank=2,
                          conv_alpha=1.0, text_encoder=True, **cfg)


@pytest.fixture
def kohya_targets(monkeypatch):
    """LyCORIS's kohya network on SD's classic targets (kohya LoCon's: the transformers, ResNet blocks, down- and
    upsamplers). Its 4.1 default also lists "TimestepEmbedding" beside the name "time_embedding.linear_1", which
    builds that layer twice on a diffusers U-Net ("duplicated lora name")."""
    import lycoris.kohya
    from lycoris.kohya import LycorisNetworkKohya

    targets = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
    for attr in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME"):  # restored after the test
        monkeypatch.setattr(LycorisNetworkKohya, attr, getattr(LycorisNetworkKohya, attr))
    LycorisNetworkKohya.apply_preset({"unet_target_module": targets, "unet_target_name": []})
    monkeypatch.setitem(lycoris.kohya.PRESET, "sd_classic", {"unet_target_module": targets, "unet_target_name": []})


def diffusers_models(pipe):
    from transformers import CLIPTextModel

    unet = diffusers.UNet2DConditionModel.from_pretrained(pipe, subfolder="unet").eval()
    text = CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder").eval()
    return unet, text


def hub_named(text) -> torch.nn.Module:
    """The CLIP text model under the module names kohya writes (`text_model.encoder.layers...`): transformers 5
    dropped the `text_model` level from CLIPTextModel, which LyCORIS's name matching (and kohya's) assumes."""
    if hasattr(text, "text_model"):
        return text
    holder = torch.nn.Module()
    holder.text_model = text
    return holder


def lycoris_outputs(pipe, path, x, t, c, ids):
    """Our kohya file through LyCORIS's kohya loader, applied to diffusers' U-Net and transformers' CLIP."""
    from lycoris.kohya import create_network_from_weights

    unet, text = diffusers_models(pipe)
    network, _ = create_network_from_weights(1.0, str(path), None, hub_named(text), unet)
    network.apply_to(hub_named(text), unet, apply_text_encoder=True, apply_unet=True)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample, text(ids).last_hidden_state, network


@pytest.mark.parametrize("kind", KINDS)
def test_our_files_load_in_lycoris_with_our_outputs(bundle, pipe, tmp_path, kind, kohya_targets):
    net = trained(bundle, kind)
    x, t, c = inputs()
    ids = bundle.text_encoder.tokenize(["a red circle", "a blue square"])
    ours, our_ctx = ours_with(bundle, net, x, t, c, ids)
    assert (ours - bundle.unet(x, t, c)).abs().max() > 1e-2  # the adapter does something
    path = save_lora_file(net, roots(bundle), tmp_path / f"{kind}.safetensors")
    theirs, their_ctx, network = lycoris_outputs(pipe, path, x, t, c, ids)
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len(net.loras)  # every module loaded
    torch.testing.assert_close(theirs, ours, **TOL)
    torch.testing.assert_close(their_ctx, our_ctx, **TOL)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and kind.replace("dora", "lora") in meta["ss_network_args"]


@pytest.mark.parametrize("algo,args", [("loha", {}), ("lokr", {"factor": 4}), ("lokr", {"decompose_both": True}),
                                       ("locon", {"dora_wd": True}), ("loha", {"use_tucker": True}),
                                       ("lokr", {"use_tucker": True, "factor": 4})])
def test_lycoris_files_load_in_ldm_with_its_outputs(bundle, pipe, tmp_path, algo, args, kohya_targets):
    """A file LyCORIS's kohya network writes (its save_weights), for the layers both adapt, applied by ldm."""
    from lycoris.kohya import create_network

    unet, text = diffusers_models(pipe)
    torch.manual_seed(5)
    network = create_network(1.0, 4, 2.0, None, hub_named(text), unet, algo=algo, conv_dim=2, conv_alpha=1.0,
                             preset="sd_classic", **args)
    network.apply_to(hub_named(text), unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(p.abs() * (1 + 0.2 * torch.rand(p.shape, generator=g)) if "dora_scale" in name
                    else torch.randn(p.shape, generator=g) * 0.2)
    x, t, c = inputs()
    ids = bundle.text_encoder.tokenize(["a red circle"])
    with torch.no_grad():
        theirs, their_ctx = unet(x, t, encoder_hidden_states=c).sample, text(ids).last_hidden_state
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {})
    if args.get("use_tucker"):  # its 3x3 convs CP/Tucker-decomposed
        assert any(k.endswith((".hada_t1", ".lokr_t2")) for k in load_file(str(path)))
    f = read_lora_file(path, roots(bundle))
    assert f.layout == "kohya" and f.unmapped == []
    assert f.kinds == [{"loha": "loha", "lokr": "lokr", "locon": "dora"}[algo]]
    ours, our_ctx = ours_with(bundle, f.network(roots(bundle)), x, t, c, ids)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_ctx, their_ctx, **TOL)


def test_peft_dora_file_loads_in_diffusers_with_our_outputs(bundle, pipe, tmp_path):
    net = trained(bundle, "dora")
    x, t, c = inputs()
    ids = bundle.text_encoder.tokenize(["a red circle", "a blue square"])
    ours, our_ctx = ours_with(bundle, net, x, t, c, ids)
    path = save_lora_file(net, roots(bundle), tmp_path / "dora", "peft")
    keys = load_file(str(path))
    assert any(k.endswith(".lora_magnitude_vector.weight") for k in keys)
    theirs, their_ctx = diffusers_with(pipe, path.parent, x, t, c, ids)
    torch.testing.assert_close(theirs, ours, **TOL)
    torch.testing.assert_close(their_ctx, our_ctx, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_files_read_back_exactly_and_merge_as_applied(bundle, tmp_path, kind):
    net = trained(bundle, kind, **({"factor": 4, "decompose_both": True} if kind == "lokr" else {}))
    layouts = ("kohya", "peft") if kind == "dora" else ("kohya",)
    for layout in layouts:
        path = save_lora_file(net, roots(bundle), tmp_path / f"{layout}.safetensors", layout)
        f = read_lora_file(path, roots(bundle))
        assert f.layout == layout and f.unmapped == [] and f.kinds == [kind]
        assert set(f.weights) == set(net.weights())
        for target, w in net.weights().items():
            assert adapter_kind(f.weights[target]) == kind
            for part, tensor in w.items():
                if part == "alpha":
                    assert float(f.weights[target]["alpha"]) == pytest.approx(float(tensor))
                else:
                    assert torch.equal(f.weights[target][part], tensor), (target, part)
    if kind != "dora":
        with pytest.raises(ValueError, match="kohya"):
            save_lora_file(net, roots(bundle), tmp_path / "peft", "peft")
    # sample.py / --merge-lora path: the merged weights equal the hooks, at a scale
    x, t, c = inputs()
    ids = bundle.text_encoder.tokenize(["a red circle"])
    net.multiplier = 0.7
    runtime, runtime_ctx = ours_with(bundle, net, x, t, c, ids)
    merged = copy.deepcopy(bundle)
    messages = []
    apply_lora_files(roots(merged), [f"{tmp_path / 'kohya.safetensors'}:0.7"], report=messages.append)
    assert f"kohya {kind}," in messages[0] and "not applied" not in messages[0]
    with torch.no_grad():
        torch.testing.assert_close(merged.unet(x, t, c), runtime, **TOL)
        torch.testing.assert_close(merged.text_encoder.encode_ids(ids), runtime_ctx, **TOL)


# ComfyUI's loader (comfy/lora.py, read with the fetch tool; the rule is rebuilt here, not imported):
# - `model_lora_keys_unet`: a module name is "lora_unet_" + <key> with "." -> "_" for every `.weight` key of the SD
#   U-Net (`diffusion_model.<key>.weight`) and of its diffusers layout (`utils.unet_to_diffusers`);
#   `model_lora_keys_clip`: "lora_te_text_model_encoder_layers_{i}_{LORA_CLIP_MAP[c]}" for the CLIP layers.
# - `load_lora` (l. 37-54): for each such name x it takes "{x}.alpha" and "{x}.dora_scale", then asks each class of
#   comfy/weight_adapter (`adapters`) to `load` x: lora.py takes "{x}.lora_up.weight" + "{x}.lora_down.weight"
#   (+ ".lora_mid.weight"), loha.py "{x}.hada_w1_a/_w1_b/_w2_a/_w2_b" (+ ".hada_t1/_t2"), lokr.py any of
#   "{x}.lokr_w1/_w2/_w1_a/_w1_b/_w2_a/_w2_b/_t2". Any other key is logged as "lora key not loaded".
COMFY_SUFFIXES = {
    "lora": {".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"},
    "loha": {".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"},
    "lokr": {".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"},
}
COMFY_ALWAYS = {".alpha", ".dora_scale"}
LORA_CLIP_MAP = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                 "mlp_fc2"]


def comfyui_consumed(keys, module_names: set[str]) -> tuple[set[str], dict[str, str]]:
    """The keys ComfyUI's load_lora would consume and, per module, the adapter class that takes it."""
    consumed, adapter = set(), {}
    for x in module_names:
        present = {k[len(x):] for k in keys if k.startswith(x + ".")}
        consumed |= {x + s for s in present & COMFY_ALWAYS}
        for name, suffixes in COMFY_SUFFIXES.items():
            taken = present & suffixes
            complete = {"lora": {".lora_up.weight", ".lora_down.weight"} <= taken,
                        "loha": {".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"} <= taken,
                        "lokr": bool(taken)}[name]
            if complete:
                consumed |= {x + s for s in taken}
                adapter[x] = name
    return consumed, adapter


@pytest.mark.parametrize("kind", ["lora", *KINDS])
def test_every_key_we_write_is_one_comfyui_consumes(bundle, pipe, tmp_path, kind):
    dunet = diffusers.UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in dunet.state_dict() if k.endswith(".weight")}
    names |= {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in bundle.unet.state_dict()
              if k.endswith(".weight")}
    layers = bundle.text_encoder.model.config.num_hidden_layers
    names |= {f"lora_te_text_model_encoder_layers_{i}_{c}" for i in range(layers) for c in LORA_CLIP_MAP}
    net = trained(bundle, kind, preset="full", **({"decompose_both": True} if kind == "lokr" else {}))
    path = save_lora_file(net, roots(bundle), tmp_path / f"{kind}.safetensors")
    keys = set(load_file(str(path)))
    consumed, adapter = comfyui_consumed(keys, names)
    assert keys == consumed, sorted(keys - consumed)[:5]
    expected = {"lora": "lora", "dora": "lora", "loha": "loha", "lokr": "lokr"}[kind]
    assert len(adapter) == len(net.loras) and set(adapter.values()) == {expected}
    assert all((x + ".dora_scale" in keys) == (kind == "dora") for x in adapter)


def test_unknown_and_incomplete_tensors_are_reported_not_applied(bundle, tmp_path):
    net = trained(bundle, "loha", preset="attention")
    path = save_lora_file(net, roots(bundle), tmp_path / "loha.safetensors")
    state = load_file(str(path))
    name = next(k for k in state if k.endswith(".hada_w1_a")).rsplit(".", 1)[0]
    state[f"{name}.lora_mid.weight"] = torch.zeros(2, 2, 1, 1)  # LoCon's CP/Tucker core: not read
    other = next(k for k in state if k.endswith(".hada_w2_b") and not k.startswith(name))
    del state[other]  # an incomplete LoHa
    save_file(state, str(tmp_path / "odd.safetensors"))
    f = read_lora_file(tmp_path / "odd.safetensors", roots(bundle))
    assert len(f.weights) == len(net.loras) - 2
    assert f"{name}.lora_mid.weight" in f.unmapped and f"{name}.hada_w1_a" in f.unmapped
    assert other.replace(".hada_w2_b", ".hada_w1_a") in f.unmapped


def test_export_verify_does_not_ask_diffusers_for_what_it_cannot_load(bundle, tmp_path):
    """`ldm.export --merge-lora FILE --verify`: diffusers' load_lora_weights is compared only for LoRA files and
    DoRA files at scale 1 (it has no LoHa / LoKr, and scales a DoRA's dW inside the norm)."""
    from ldm.evaluation.export_check import not_for_diffusers
    from ldm.formats.lora_files import file_kinds

    files = {kind: save_lora_file(trained(bundle, kind, preset="attention"), roots(bundle),
                                  tmp_path / f"{kind}.safetensors") for kind in ("lora", *KINDS)}
    peft = save_lora_file(trained(bundle, "dora", preset="attention"), roots(bundle), tmp_path / "peft", "peft")
    assert {k: file_kinds(p) for k, p in files.items()} == {k: {k} for k in files}
    assert file_kinds(peft) == {"dora"}
    assert not_for_diffusers([str(files["lora"]), f"{files['dora']}:1", f"{peft}"]) is None
    assert "loha" in not_for_diffusers([str(files["lora"]), str(files["loha"])])
    assert "lokr" in not_for_diffusers([str(files["lokr"])])
    assert "scale 0.5" in not_for_diffusers([f"{files['dora']}:0.5"])
