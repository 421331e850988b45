"""LoRA on a Flux in diffusers' layout (`transformer.*` + `text_encoder.*` with `lora_A` / `lora_B`, what
FluxPipeline.load_lora_weights reads): our file loads in diffusers' FluxPipeline (a tiny one saved by diffusers,
loaded whole by ours) with our adapted transformer output, text context and sampled latents within 1e-5; a LoRA made
with peft on diffusers' FluxTransformer2DModel (separate to_q / to_k / to_v / proj_mlp LoRAs of different ranks)
reads into ours with its outputs; files read back exactly."""

import pytest
import torch

from ldm.formats.load import load_bundle
from ldm.formats.lora_files import apply_lora_files, read_lora_file, save_lora_file
from tests.helpers.flux import write_tiny_flux_folder
from tests.helpers.lora import roots, trained
from tests.helpers.transformer_lora import assert_same, assert_samples_with_lora

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "a blue square"]


def tiny_flux(tmp_path):
    """(FluxPipeline, our bundle of the same folder)."""
    folder, _ = write_tiny_flux_folder(tmp_path)
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder), load_bundle(folder)


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.25, 0.875]), torch.randn(2, 5, 24, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([3.5, 3.5]))


def ours(bundle, net=None):
    """Our transformer output (t in [0, 1] as 1000 t) and text context, with `net` attached (or none)."""
    x, t, ctx, y, guidance = inputs()
    if net is not None:
        net.attach(roots(bundle))
    try:
        with torch.no_grad():
            out = bundle.unet(x, t * 1000, {"crossattn": ctx, "vector": y, "guidance": guidance})
            text = bundle.text_encoder(PROMPTS)
    finally:
        if net is not None:
            net.detach()
    return out, text


def theirs(pipe):
    from diffusers import FluxPipeline

    x, t, ctx, y, guidance = inputs()
    with torch.no_grad():
        ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        out = pipe.transformer(FluxPipeline._pack_latents(x, 2, 16, 8, 8), pooled_projections=y, timestep=t,
                               encoder_hidden_states=ctx, txt_ids=torch.zeros(5, 3), img_ids=ids, guidance=guidance,
                               return_dict=False)[0]
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=512)
    return FluxPipeline._unpack_latents(out, 16, 16, 2), {"crossattn": embeds, "vector": pooled}




def test_our_flux_lora_loads_in_flux_pipeline_with_our_outputs(tmp_path):
    """preset=full: every Linear of the Flux (the fused qkv, the single blocks' linear1 = q / k / v / MLP, the
    final adaLN whose halves diffusers swaps, the embedders) + CLIP-L; one layer with its own alpha."""
    from safetensors import safe_open

    pipe, bundle = tiny_flux(tmp_path)
    net = trained(bundle, preset="full", rank=3, alpha=2.0, text_encoder=True)
    with torch.no_grad():  # PEFT's alpha_pattern
        net.loras["unet_single_blocks_1_linear1"].alpha.fill_(5.0)
    base, adapted = ours(bundle), ours(bundle, net)
    assert (adapted[0] - base[0]).abs().max() > 1e-2 and (adapted[1]["vector"] - base[1]["vector"]).abs().max() > 1e-2
    assert_same(theirs(pipe), base)  # the same model before the LoRA
    folder = save_lora_file(net, roots(bundle), tmp_path / "lora", "peft").parent
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    for key in ("transformer.transformer_blocks.0.attn.to_k.lora_A.weight",
                "transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight",
                "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight",
                "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
                "transformer.norm_out.linear.lora_B.weight", "transformer.x_embedder.lora_A.weight",
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"):
        assert key in keys, key
    pipe.load_lora_weights(str(folder))
    assert_same(theirs(pipe), adapted)
    back = read_lora_file(folder, roots(bundle))
    assert back.layout == "peft" and not back.unmapped and set(back.weights) == set(net.weights())
    for k, w in net.weights().items():
        assert torch.equal(back.weights[k]["down"], w["down"]) and torch.equal(back.weights[k]["up"], w["up"]), k
    assert_same(ours(bundle, back.network(roots(bundle))), adapted)


def test_sampling_with_our_lora_equals_the_pipeline_with_it(tmp_path):
    from diffusers import FluxPipeline

    pipe, bundle = tiny_flux(tmp_path)
    net = trained(bundle, preset="attention_ff", rank=2, alpha=4.0, text_encoder=True)
    pipe.load_lora_weights(str(save_lora_file(net, roots(bundle), tmp_path / "lora", "peft").parent))
    packed = pipe(PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(7), output_type="latent", return_dict=False)[0]
    expected = FluxPipeline._unpack_latents(packed, 16, 16, 2)

    assert_samples_with_lora(bundle, net, tmp_path / "lora", expected, PROMPTS, 3.5)


def test_a_diffusers_saved_flux_lora_reads_with_equal_outputs(tmp_path):
    """peft's own LoRAs on diffusers' modules (separate q / k / v / proj_mlp of different ranks and alphas, the
    swapped norm_out), saved by FluxPipeline.save_lora_weights: our reader gives its outputs."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe, bundle = tiny_flux(tmp_path)
    base = ours(bundle)
    torch.manual_seed(11)
    pipe.transformer.add_adapter(LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"to_k": 2}, alpha_pattern={"proj_mlp": 3.0},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "proj_mlp", "proj_out", "norm_out.linear", "ff.net.0.proj"]))
    expected = theirs(pipe)
    assert (expected[0] - base[0]).abs().max() > 1e-2
    FluxPipeline.save_lora_weights(tmp_path / "theirs",
                                   transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                   transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())
    f = read_lora_file(tmp_path / "theirs", roots(bundle))
    assert f.layout == "peft" and f.unmapped == []
    # a single block's linear1: q (r 4), k (r 2), v (r 4), proj_mlp (r 4, alpha 3) -> one rank-14 LoRA
    assert f.weights[("unet", "single_blocks.0.linear1")]["down"].shape[0] == 14
    assert_same(ours(bundle, f.network(roots(bundle))), (expected[0], base[1]))
