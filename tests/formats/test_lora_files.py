"""LoRA files: the kohya and diffusers/PEFT files we write load in diffusers (the reference) and give the U-Net and
text-encoder outputs we compute with the adapter; a LoRA made with peft on a diffusers U-Net loads in ldm with equal
outputs; our kohya names are the ones ComfyUI's mapping builds; bad files fail with the file's name."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from ldm.formats.lora_files import LoRAFileError, apply_lora_files, read_lora_file, save_lora_file
from ldm.models.lora import LoRAConfig, LoRANetwork
from ldm.models.unet import UNet
from tests.helpers.lora import bundle, diffusers_with, inputs, ours_with, pipe, roots  # noqa: F401 - fixtures

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_network(bundle, seed=3, **cfg) -> LoRANetwork:
    """A network as after training: up weights non-zero, so the adapter changes the output."""
    torch.manual_seed(seed)
    net = LoRANetwork.build(roots(bundle), LoRAConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.loras.values():
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=g) * 0.2)
    return net.eval()


@pytest.mark.parametrize("layout", ["peft", "kohya"])
@pytest.mark.parametrize("preset", ["attention", "full"])
def test_diffusers_load_lora_weights_gives_our_outputs(bundle, pipe, tmp_path, layout, preset):
    net = trained_network(bundle, preset=preset, rank=4, alpha=2.0, conv_rank=3, conv_alpha=6.0,
                          text_encoder=True)
    x, t, c = inputs()
    ids = bundle.text_encoder.tokenize(["a red circle", "a blue square"])
    base_out = bundle.unet(x, t, c).detach()
    ours, our_ctx = ours_with(bundle, net, x, t, c, ids)
    assert (ours - base_out).abs().max() > 1e-2  # the adapter does something
    name = "lora.safetensors" if layout == "kohya" else None
    path = save_lora_file(net, roots(bundle), tmp_path / (name or "lora_dir"), layout)
    theirs, their_ctx = diffusers_with(pipe, path.parent, x, t, c, ids, weight_name=path.name)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(their_ctx, our_ctx, atol=1e-5, rtol=1e-5)


def test_written_files_read_back_exactly(bundle, tmp_path):
    net = trained_network(bundle, preset="full", rank=2, alpha=3.0, conv_rank=5)
    for layout in ("kohya", "peft"):
        path = save_lora_file(net, roots(bundle), tmp_path / f"{layout}.safetensors", layout)
        f = read_lora_file(path, roots(bundle))
        assert f.layout == layout and f.unmapped == []
        assert set(f.weights) == set(net.weights())
        for target, w in net.weights().items():
            assert torch.equal(f.weights[target]["down"], w["down"]) and torch.equal(f.weights[target]["up"], w["up"])
            assert f.weights[target]["alpha"] == pytest.approx(float(w["alpha"]))


def test_peft_lora_on_a_diffusers_unet_loads_in_ldm(bundle, pipe, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = diffusers.UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.2"],
                        rank_pattern={"conv2": 2}, alpha_pattern={"to_k": 3.0})
    torch.manual_seed(11)
    unet.add_adapter(config)
    x, t, c = inputs()
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=c).sample
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    f = read_lora_file(tmp_path, roots(bundle))
    assert f.layout == "peft" and f.unmapped == []
    ours, _ = ours_with(bundle, f.network(roots(bundle)), x, t, c)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def comfyui_unet_key_map(unet: UNet, diffusers_unet) -> dict[str, str]:
    """The kohya names ComfyUI's comfy/lora.py `model_lora_keys_unet` derives for a model (read from its source,
    rebuilt here): every `diffusion_model.<key>.weight` of the SD layout, and every diffusers key, with "." -> "_".
    The diffusers keys come from diffusers' own UNet2DConditionModel, not from our key map."""
    keys = {}
    for k in unet.state_dict():
        if k.endswith(".weight"):
            keys["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = "sd"
    for k in diffusers_unet.state_dict():
        if k.endswith(".weight"):
            keys["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = "diffusers"
    return keys


def test_kohya_names_are_the_ones_comfyui_maps(bundle, pipe, tmp_path):
    from safetensors import safe_open

    dunet = diffusers.UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    comfy = comfyui_unet_key_map(bundle.unet, dunet)
    for preset in ("attention", "attention_ff", "full"):
        net = trained_network(bundle, preset=preset)
        path = save_lora_file(net, roots(bundle), tmp_path / f"{preset}.safetensors")
        with safe_open(str(path), "pt") as f:
            names = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in f.keys()}
            meta = f.metadata()
        # kohya writes diffusers-named modules; every one is in the list ComfyUI builds from diffusers' U-Net
        assert {comfy.get(n) for n in names} == {"diffusers"}, sorted(n for n in names if n not in comfy)[:5]
        assert len(names) == len(net.loras)
        assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.architecture"].endswith("/lora")
    # text encoder: ComfyUI's model_lora_keys_clip maps lora_te_text_model_encoder_layers_{i}_{LORA_CLIP_MAP[c]}
    clip_map = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    layers = bundle.text_encoder.model.config.num_hidden_layers
    comfy_te = {f"lora_te_text_model_encoder_layers_{i}_{c}" for i in range(layers) for c in clip_map}
    net = trained_network(bundle, preset="attention", text_encoder=True)
    path = save_lora_file(net, roots(bundle), tmp_path / "te.safetensors")
    with safe_open(str(path), "pt") as f:
        te_names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in f.keys()
                    if k.startswith("lora_te_")}
    assert te_names == comfy_te
    # and the SD-named variant (lora_unet_input_blocks_...) that ComfyUI also maps reads into the same layers
    net = trained_network(bundle, preset="attention")
    sd_named = {}
    for (root, path), w in net.weights().items():
        name = "lora_unet_" + path.replace(".", "_")
        assert comfy.get(name) == "sd"
        sd_named.update({f"{name}.lora_down.weight": w["down"], f"{name}.lora_up.weight": w["up"],
                         f"{name}.alpha": w["alpha"]})
    save_file(sd_named, str(tmp_path / "sd_named.safetensors"))
    f = read_lora_file(tmp_path / "sd_named.safetensors", roots(bundle))
    assert f.unmapped == [] and set(f.weights) == set(net.weights())


def test_merged_weights_equal_the_runtime_adapter(bundle, tmp_path):
    net = trained_network(bundle, preset="full", rank=3, conv_rank=2, text_encoder=True)
    path = save_lora_file(net, roots(bundle), tmp_path / "l.safetensors")
    x, t, c = inputs()
    ids = bundle.text_encoder.tokenize(["a red circle"])
    runtime, runtime_ctx = ours_with(bundle, net, x, t, c, ids)
    merged = copy.deepcopy(bundle)
    messages = []
    apply_lora_files(roots(merged), [f"{path}:0.5", str(path) + ":0.5"], report=messages.append)
    with torch.no_grad():
        torch.testing.assert_close(merged.unet(x, t, c), runtime, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.text_encoder.encode_ids(ids), runtime_ctx, atol=1e-5, rtol=1e-5)
    assert len(messages) == 2 and "kohya" in messages[0]


def test_unmapped_keys_are_reported_not_dropped(bundle, tmp_path):
    net = trained_network(bundle)
    path = save_lora_file(net, roots(bundle), tmp_path / "l.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 8)
    state["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 4)
    state["lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a"] = torch.zeros(4, 4)  # LoHa: not LoRA
    save_file(state, str(tmp_path / "extra.safetensors"))
    messages = []
    apply_lora_files(roots(copy.deepcopy(bundle)), [str(tmp_path / "extra.safetensors")], report=messages.append)
    assert "3 keys not applied" in messages[0] and "no_such_block" in messages[0] and "hada_w1_a" in messages[0]


def test_bad_files_fail_naming_the_file(bundle, tmp_path):
    r = roots(bundle)
    with pytest.raises(LoRAFileError, match="not found"):
        read_lora_file(tmp_path / "missing.safetensors", r)
    (tmp_path / "l.pt").write_bytes(b"\x80\x04")
    with pytest.raises(LoRAFileError, match=r"l\.pt.*only as \.safetensors"):
        read_lora_file(tmp_path / "l.pt", r)
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoRAFileError, match="broken.safetensors.*corrupt"):
        read_lora_file(tmp_path / "broken.safetensors", r)
    save_file({"model.diffusion_model.x.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoRAFileError, match="not a LoRA layout"):
        read_lora_file(tmp_path / "model.safetensors", r)
    net = trained_network(bundle)
    path = save_lora_file(net, r, tmp_path / "ok.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(path))
    key = next(k for k in state if k.endswith("lora_down.weight"))
    state[key] = torch.zeros(4, 3)  # wrong in-features
    save_file(state, str(tmp_path / "misfit.safetensors"))
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    with pytest.raises(LoRAFileError, match="misfit.safetensors.*do not fit"):
        apply_lora_files(r, [str(path), str(tmp_path / "misfit.safetensors")])
    assert all(torch.equal(before[k], v) for k, v in bundle.unet.state_dict().items())  # nothing was changed


def test_kohya_metadata_names_the_base_model_as_sd_scripts_does(bundle, tmp_path):
    """sd-scripts' ss_base_model_version / modelspec.architecture (library/model_util.py
    get_model_version_str_for_sd1_sd2, library/sai_model_spec.py determine_architecture)."""
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.formats.lora_kohya import infer_base_model_version, model_spec_architecture

    path = save_lora_file(trained_network(bundle, preset="attention"), roots(bundle), tmp_path / "sd1.safetensors",
                          prediction_type="epsilon")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.architecture"]) == (
        "sd_v1", "False", "stable-diffusion-v1/lora")
    with torch.device("meta"):
        openclip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, hidden_act="gelu"))
        sd2_unet = UNet.from_preset("tiny", context_dim=1024)
    assert infer_base_model_version({"unet": bundle.unet, "text_encoder": openclip}) == "sd_v2"
    assert infer_base_model_version({"unet": sd2_unet}, "v_prediction") == "sd_v2_v"
    assert infer_base_model_version({"unet": bundle.unet}, "v_prediction") == "sd_v1_v"
    assert [model_spec_architecture(v) for v in ("sd_v1_v", "sd_v2", "sd_v2_v", "sdxl_base_v1-0")] == [
        "stable-diffusion-v1/lora", "stable-diffusion-v2-512/lora", "stable-diffusion-v2-768-v/lora",
        "stable-diffusion-xl-v1-base/lora"]
