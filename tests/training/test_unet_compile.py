"""A compile-clean step (issue 28, item 2): ``module.compile=true`` compiles the U-Net with fullgraph=True, so a
graph break is an error, not a silent fallback to eager. For a tiny model of every preset's architecture (SD 1.x:
conv projections, a fixed head count; inpainting: 9 input channels; SD 2.x: linear projections, head channels;
SDXL: the vector conditioning, per-level depths, no attention at the first level), with LoRA / LoCon hooks and
with gradient checkpointing, the training forward and backward compile into one graph that gives the eager
gradients; the sampler's denoiser call (classifier-free guidance over a doubled batch) compiles once for every
step. The graph checks use the eager / aot_eager backends (no C++ compiler, seconds); inductor is a slow test."""

from __future__ import annotations

import shutil
from dataclasses import asdict

import pytest
import torch
from torch._dynamo.utils import counters

from ldm.diffusion.guidance import Conditioning, classifier_free_guidance
from ldm.diffusion.samplers import ddim
from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.lora import LoRAConfig, LoRANetwork
from ldm.models.unet import UNET_PRESETS, UNet, UNetConfig
from ldm.training.module.unet_compile import UNetCompile

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT_DIM, ADM = 16, 24


def tiny_of(preset: str, **overrides) -> dict:
    """The preset's architecture (projections, heads, attention levels, depths, conditioning, input channels) at
    test size: 32 channels, at most 3 levels and 2 transformer blocks, one ResBlock per level."""
    cfg = {**asdict(UNetConfig()), **UNET_PRESETS[preset]}
    levels = min(3, len(cfg["channel_mult"]))
    depth = cfg["transformer_depth"]
    return {**cfg, "model_channels": 32, "channel_mult": tuple(min(m, 2) for m in cfg["channel_mult"][:levels]),
            "num_res_blocks": 1, "attention_levels": tuple(lvl for lvl in cfg["attention_levels"] if lvl < levels),
            "transformer_depth": depth if isinstance(depth, int) else tuple(min(d, 2) for d in depth[:levels]),
            "context_dim": CONTEXT_DIM, "num_heads": 2 if cfg["num_heads"] > 0 else -1,
            "num_head_channels": 16 if cfg["num_head_channels"] > 0 else -1,
            "adm_in_channels": None if cfg["adm_in_channels"] is None else ADM, **overrides}


def inputs(unet: UNet, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config["in_channels"], 8, 8, generator=g)
    context = torch.randn(batch, 5, CONTEXT_DIM, generator=g)
    if unet.config.get("adm_in_channels") is not None:
        context = {"crossattn": context, "vector": torch.randn(batch, ADM, generator=g)}
    return x, context


def with_lora(unet: UNet, preset: str = "full") -> LoRANetwork:
    """Adapters (full: LoCon on every layer kind, attention, feed-forward, ResBlock convs) with B random, so that
    the hooks change the output."""
    network = LoRANetwork.build({"unet": unet}, LoRAConfig(preset=preset, rank=2)).attach({"unet": unet})
    with torch.no_grad():
        for lora in network.loras.values():
            lora.up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return network


def forward_backward(unet, trained, x, t, context):
    for p in trained:
        p.grad = None
    out = unet(x, t, context)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in trained]


PRESETS = ["sd15", "sd15-inpaint", "sd21", "sdxl", "tiny", "small"]
CASES = [(p, "plain") for p in PRESETS] + [("tiny", "locon"), ("sdxl", "lora"), ("sd21", "checkpointing")]
LORA = {"locon": "full", "lora": "attention_ff"}


@pytest.mark.parametrize("preset, variant", CASES, ids=[f"{p}-{v}" for p, v in CASES])
def test_training_forward_and_backward_compile_into_one_graph(preset, variant, capsys):
    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = UNet(**tiny_of(preset, gradient_checkpointing=variant == "checkpointing")).train()
    trained = list(with_lora(unet, LORA[variant]).parameters()) if variant in LORA else list(unet.parameters())
    x, context = inputs(unet)
    t = torch.tensor([3, 700])
    eager_out, eager_grads = forward_backward(unet, trained, x, t, context)
    counters.clear()
    compiled = UNetCompile(unet, "eager")  # module.compile=true, compile_backend=eager: fullgraph, a break raises
    out, grads = forward_backward(compiled, trained, x, t, context)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, eager_out)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
    assert "first forward" in capsys.readouterr().out


def test_aot_autograd_compiles_the_backward_of_a_locon_step():
    """aot_eager traces the joint forward + backward graph (what inductor then compiles), hooks and gradient
    checkpointing included."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = UNet(**tiny_of("tiny", gradient_checkpointing=True)).train()
    trained = list(with_lora(unet).parameters())
    x, context = inputs(unet)
    eager_out, eager_grads = forward_backward(unet, trained, x, torch.tensor([3, 700]), context)
    counters.clear()
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True, dynamic=False)
    out, grads = forward_backward(compiled, trained, x, torch.tensor([3, 700]), context)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, eager_out)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_sampling_compiles_the_denoiser_call_once_for_every_step(preset):
    """DDIM with classifier-free guidance: the U-Net sees the doubled batch at every step (one graph, no
    recompilation as t changes), and the guidance call itself (the concatenations, the combination) traces into a
    single graph around it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = UNet(**tiny_of(preset)).eval()
    schedule = NoiseSchedule.make("scaled_linear", 1000)
    x, context = inputs(unet, batch=1)
    _, uncond = inputs(unet, batch=1, seed=1)
    cond, steps = Conditioning(context, uncond), torch.tensor([999.0, 666.0, 333.0, 0.0])
    with torch.no_grad():
        eager = ddim(unet, x, schedule, steps, cond=cond, guidance_scale=4.0)
        guided = classifier_free_guidance(unet, x, torch.tensor([500.0]), cond, 4.0)
        counters.clear()
        denoiser_call = torch.compile(classifier_free_guidance, fullgraph=True, backend="eager")
        torch.testing.assert_close(denoiser_call(unet, x, torch.tensor([500.0]), cond, 4.0), guided)
        torch.testing.assert_close(denoiser_call(unet, x, torch.tensor([250.0]), cond, 4.0),
                                   classifier_free_guidance(unet, x, torch.tensor([250.0]), cond, 4.0))
        assert counters["stats"]["unique_graphs"] == 1
        torch._dynamo.reset()
        counters.clear()
        UNetCompile(unet, "eager")
        sampled = ddim(unet, x, schedule, steps, cond=cond, guidance_scale=4.0)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(sampled, eager)


@pytest.mark.slow
def test_inductor_compiles_an_sdxl_lora_training_step():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on the CPU needs a C++ compiler")
    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = UNet(**tiny_of("sdxl")).train()
    trained = list(with_lora(unet).parameters())
    x, context = inputs(unet)
    eager_out, eager_grads = forward_backward(unet, trained, x, torch.tensor([3, 700]), context)
    UNetCompile(unet, "inductor")
    out, grads = forward_backward(unet, trained, x, torch.tensor([3, 700]), context)
    torch.testing.assert_close(out, eager_out, atol=1e-4, rtol=1e-4)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
