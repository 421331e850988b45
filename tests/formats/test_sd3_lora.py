"""LoRA on the MMDiT (SD3) in diffusers' layout (`transformer.*` / `text_encoder*.` + `lora_A` / `lora_B`, what
StableDiffusion3Pipeline.load_lora_weights reads) and in kohya sd-scripts' (`lora_unet_joint_blocks_*`, `lora_te1_` /
`lora_te2_` / `lora_te3_`, networks/lora_sd3.py):
- our file loads in diffusers' pipeline and gives our adapted outputs (transformer, text contexts, sampled latents)
  within 1e-5;
- a LoRA made with peft on diffusers' SD3 transformer and CLIPs, saved by diffusers, reads into ours with equal
  outputs (its separate to_q / to_k / to_v LoRAs become one on our fused qkv);
- files read back exactly; kohya's SD3 names for the three text encoders."""

from __future__ import annotations

import pytest
import torch

from ldm.formats.lora_files import LoRAFileError, apply_lora_files, read_lora_file, save_lora_file
from ldm.models.lora import LoRANetwork
from tests.helpers.lora import roots, trained
from tests.helpers.sd3_pair import T5_LENGTH, tiny_sd3
from tests.helpers.transformer_lora import assert_same, assert_samples_with_lora

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "a blue square"]


def transformer_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 6, generator=g), torch.tensor([250.0, 875.5]),
            torch.randn(2, 5, 96, generator=g), torch.randn(2, 64, generator=g))


def ours(bundle, net=None):
    """Our transformer output and text context, with `net`'s hooks attached (or none)."""
    x, t, ctx, y = transformer_inputs()
    if net is not None:
        net.attach(roots(bundle))
    try:
        with torch.no_grad():
            out = bundle.unet(x, t, {"crossattn": ctx, "vector": y})
            text = bundle.text_encoder(PROMPTS)
    finally:
        if net is not None:
            net.detach()
    return out, text


def theirs(pipe):
    x, t, ctx, y = transformer_inputs()
    with torch.no_grad():
        out = pipe.transformer(x, ctx, y, t, return_dict=False)[0]
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
    return out, {"crossattn": embeds, "vector": pooled}




def test_our_lora_loads_in_stable_diffusion3_pipeline_with_our_outputs(tmp_path):
    """preset=full: every Linear of the MMDiT (the adaLN layers whose halves diffusers swaps, the embedders) and
    the patch conv, + both CLIPs; ranks and alphas differ between layers (PEFT's rank_pattern / alpha_pattern)."""
    pipe, bundle = tiny_sd3(tmp_path)
    net = trained(bundle, preset="full", rank=3, alpha=2.0, text_encoder=True)
    with torch.no_grad():  # one layer with its own alpha: PEFT's alpha_pattern
        net.loras["unet_joint_blocks_1_context_block_adaLN_modulation_1"].alpha.fill_(5.0)
    base, adapted = ours(bundle), ours(bundle, net)
    assert (adapted[0] - base[0]).abs().max() > 1e-2 and (adapted[1]["vector"] - base[1]["vector"]).abs().max() > 1e-2
    folder = save_lora_file(net, roots(bundle), tmp_path / "lora", "peft").parent
    from safetensors import safe_open

    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    # diffusers' names: the fused qkv as to_q / to_k / to_v, the text stream's as add_*_proj, bigG as text_encoder_2
    for key in ("transformer.transformer_blocks.0.attn.to_k.lora_A.weight",
                "transformer.transformer_blocks.1.attn.add_v_proj.lora_B.weight",
                "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight",
                "transformer.norm_out.linear.lora_B.weight", "transformer.pos_embed.proj.lora_A.weight",
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_B.weight"):
        assert key in keys, key
    assert_same(theirs(pipe), base)  # the same model before the LoRA
    pipe.load_lora_weights(str(folder))
    assert_same(theirs(pipe), adapted)


def test_our_dora_loads_in_stable_diffusion3_pipeline_with_our_outputs(tmp_path):
    """DoRA's norm is per output row, so the fused qkv's magnitude splits exactly into to_q / to_k / to_v's."""
    pipe, bundle = tiny_sd3(tmp_path)
    net = trained(bundle, type="dora", preset="attention", rank=2, alpha=3.0, text_encoder=True)
    adapted = ours(bundle, net)
    assert (adapted[0] - ours(bundle)[0]).abs().max() > 1e-2
    folder = save_lora_file(net, roots(bundle), tmp_path / "dora", "peft").parent
    pipe.load_lora_weights(str(folder))
    assert_same(theirs(pipe), adapted)
    back = read_lora_file(folder, roots(bundle))
    assert back.kinds == ["dora"] and set(back.weights) == set(net.weights())
    assert_same(ours(bundle, back.network(roots(bundle))), adapted)


def test_sampling_with_our_lora_equals_the_pipeline_with_it(tmp_path):
    pipe, bundle = tiny_sd3(tmp_path)
    net = trained(bundle, preset="attention_ff", rank=2, alpha=4.0, text_encoder=True)
    pipe.load_lora_weights(str(save_lora_file(net, roots(bundle), tmp_path / "lora", "peft").parent))
    expected = pipe(PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=4.5,
                    generator=torch.Generator().manual_seed(7), output_type="latent", max_sequence_length=T5_LENGTH,
                    return_dict=False)[0]

    assert_samples_with_lora(bundle, net, tmp_path / "lora", expected, PROMPTS, 4.5)


def test_a_diffusers_saved_sd3_lora_reads_with_equal_outputs(tmp_path):
    """peft's own LoRAs on diffusers' modules (separate q / k / v of different ranks and alphas, the swapped
    norm_out, both CLIPs), saved by StableDiffusion3Pipeline.save_lora_weights: our reader gives its outputs."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe, bundle = tiny_sd3(tmp_path)
    base = ours(bundle)
    torch.manual_seed(11)
    pipe.transformer.add_adapter(LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"to_k": 2}, alpha_pattern={"add_v_proj": 3.0},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "ff.net.0.proj", "norm_out.linear", "proj_out"]))
    te_config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    for te in (pipe.text_encoder, pipe.text_encoder_2):  # peft directly (transformers' add_adapter wants peft 0.22)
        inject_adapter_in_model(te_config, te)
    expected = theirs(pipe)
    assert (expected[0] - base[0]).abs().max() > 1e-2
    assert (expected[1]["crossattn"] - base[1]["crossattn"]).abs().max() > 1e-2  # both CLIPs' LoRAs act
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "theirs", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(), text_encoder_2_lora_adapter_metadata=te_config.to_dict())
    f = read_lora_file(tmp_path / "theirs", roots(bundle))
    assert f.layout == "peft" and f.unmapped == []
    # block 0's x qkv: q (r 4, alpha 8), k (r 2, alpha 8), v (r 4, alpha 8) -> one rank-10 LoRA on the fused layer
    assert f.weights[("unet", "joint_blocks.0.x_block.attn.qkv")]["down"].shape[0] == 10
    assert_same(ours(bundle, f.network(roots(bundle))), expected)
    # the transformer's part as a PeftModel names it (base_model.model.<diffusers path>, which ComfyUI reads too)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "theirs" / "pytorch_lora_weights.safetensors"), "pt") as file:
        peft_model = {"base_model.model." + k.removeprefix("transformer."): file.get_tensor(k) for k in file.keys()
                      if k.startswith("transformer.")}
        metadata = file.metadata()  # the alphas (lora_adapter_metadata)
    save_file(peft_model, str(tmp_path / "peft_model.safetensors"), metadata=metadata)
    g = read_lora_file(tmp_path / "peft_model.safetensors", roots(bundle))
    assert not g.unmapped and set(g.weights) == {k for k in f.weights if k[0] == "unet"}
    assert all(torch.equal(g.weights[k]["up"], f.weights[k]["up"]) for k in g.weights)


def test_written_files_read_back_exactly(tmp_path):
    _, bundle = tiny_sd3(tmp_path)
    net = trained(bundle, preset="full", rank=2, alpha=3.0, text_encoder=True)
    for layout in ("peft", "kohya"):
        path = save_lora_file(net, roots(bundle), tmp_path / f"{layout}.safetensors", layout)
        f = read_lora_file(path, roots(bundle))
        assert f.layout == layout and f.unmapped == [] and set(f.weights) == set(net.weights())
        for target, w in net.weights().items():  # a fused qkv comes back as the rank-r LoRA it was
            for part in ("down", "up"):
                assert torch.equal(f.weights[target][part], w[part].float().reshape(f.weights[target][part].shape))
            assert f.weights[target]["alpha"] == pytest.approx(float(w["alpha"]))


def test_kohya_sd3_names_are_sd_scripts(tmp_path):
    """sd-scripts' networks/lora_sd3.py: lora_unet_ + the original MMDiT module path, lora_te1_ / lora_te2_ /
    lora_te3_ + the CLIP-L / CLIP-G / T5 module path ("." -> "_"). A file with a T5 LoRA applies to our T5."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, bundle = tiny_sd3(tmp_path, use_t5=True)
    net = trained(bundle, preset="attention", rank=2, text_encoder=True)
    path = save_lora_file(net, roots(bundle), tmp_path / "kohya.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert {"lora_unet_joint_blocks_1_context_block_attn_qkv.lora_down.weight",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha"} <= keys
    assert not any(k.startswith("lora_te3_") for k in keys)  # T5 trains only when asked (sd-scripts: train_t5xxl)
    # a T5 LoRA as sd-scripts names it: lora_te3_ + T5EncoderModel's module path
    t5 = bundle.text_encoder.t5
    g = torch.Generator().manual_seed(5)
    q = t5.encoder.block[0].layer[0].SelfAttention.q
    name = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    save_file({f"{name}.lora_down.weight": torch.randn(2, q.in_features, generator=g),
               f"{name}.lora_up.weight": torch.randn(q.out_features, 2, generator=g), f"{name}.alpha": torch.tensor(1.0)},
              str(tmp_path / "t5.safetensors"))
    f = read_lora_file(tmp_path / "t5.safetensors", roots(bundle))
    assert list(f.weights) == [("text_encoder", "t5.encoder.block.0.layer.0.SelfAttention.q")] and not f.unmapped
    before = bundle.text_encoder(PROMPTS)["crossattn"][:, 77:]
    apply_lora_files(roots(bundle), [str(tmp_path / "t5.safetensors")], report=lambda m: None)
    assert (bundle.text_encoder(PROMPTS)["crossattn"][:, 77:] - before).abs().max() > 1e-3
    # the diffusers layout has no T5 component: writing one is refused by name
    t5_net = LoRANetwork.from_weights(roots(bundle), f.weights)
    with pytest.raises(ValueError, match="T5"):
        save_lora_file(t5_net, roots(bundle), tmp_path / "peft_t5", "peft")


def test_bad_sd3_peft_files_fail_naming_the_layer(tmp_path):
    from safetensors.torch import save_file

    _, bundle = tiny_sd3(tmp_path)
    bad = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
           "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(31, 2)}  # not the q block (32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoRAFileError, match="joint_blocks.0.x_block.attn.qkv"):
        read_lora_file(tmp_path / "bad.safetensors", roots(bundle))
