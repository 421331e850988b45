"""Tests for ldm.models.unet: SD key layout, parity with diffusers, presets, checkpointing, compile."""

import json
import time

import pytest
import torch

import ldm.models.unet as unet_mod
from ldm.models.unet import UNET_PRESETS, UNet

LDM_PREFIX = "model.diffusion_model."

# SD2-style small config: linear projection, fixed head width, depth 2, a level without attention,
# num_res_blocks=2 (exercises the converter's layers_per_block arithmetic and both upsampler positions)
SD2_STYLE = dict(
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(0, 1),
    num_heads=-1,
    num_head_channels=16,
    transformer_depth=2,
    context_dim=24,
    use_linear_projection=True,
)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def diffusers_config(cfg):
    """A diffusers UNet2DConditionModel config equivalent to our UNet config (test-only)."""
    levels = range(len(cfg["channel_mult"]))
    block_out = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    if cfg["num_head_channels"] > 0:
        heads = [c // cfg["num_head_channels"] for c in block_out]
    else:
        heads = cfg["num_heads"]
    att = set(cfg["attention_levels"])
    return dict(
        sample_size=8,
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if i in att else "DownBlock2D" for i in levels],
        up_block_types=["CrossAttnUpBlock2D" if i in att else "UpBlock2D" for i in reversed(levels)],
        block_out_channels=block_out,
        layers_per_block=cfg["num_res_blocks"],
        cross_attention_dim=cfg["context_dim"],
        attention_head_dim=heads,  # diffusers' legacy name: this is the number of heads
        use_linear_projection=cfg["use_linear_projection"],
        transformer_layers_per_block=cfg["transformer_depth"],
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def to_diffusers_state_dict(state_dict, dcfg):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ckpt = {LDM_PREFIX + k: v for k, v in state_dict.items()}
    return convert_ldm_unet_checkpoint(ckpt, dcfg)


@torch.no_grad()
def randomize_(model, seed=0):
    """Overwrite EVERY parameter (norm affines, zero-init convs included) with seeded random values."""
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            r = torch.randn(p.shape, generator=g)
            if isinstance(mod, norms) and name == "weight":
                p.copy_(1.0 + 0.2 * r)
            elif p.ndim >= 2:
                p.copy_(r / p[0].numel() ** 0.5)  # ~unit-variance activations
            else:
                p.copy_(0.2 * r)
    return model


# -----------------------------------------------------------------------------
# parity with diffusers' UNet2DConditionModel through diffusers' own SD->diffusers converter


@pytest.mark.parametrize(
    "style, t",
    [
        ("sd1", 500),  # python int, broadcast to the batch
        ("sd1", torch.tensor([1, 999])),  # int batch vector
        ("sd1", torch.tensor([12.5, 700.25])),  # fractional timesteps
        ("sd2", torch.tensor([3, 999])),
        ("sd2", torch.tensor(250.75)),  # 0-d float tensor
    ],
)
def test_parity_with_diffusers(style, t):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ours = UNet.from_preset("tiny") if style == "sd1" else UNet(**SD2_STYLE)
    randomize_(ours).eval()
    dcfg = diffusers_config(ours.config)
    ref = UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict(), dcfg), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, ours.config["context_dim"], generator=g)
    with torch.no_grad():
        out = ours(x, t, ctx)
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        shifted = ours(x, torch.as_tensor(t) + 0.5, ctx)
    assert out.shape == (2, 4, 8, 8)
    assert out.abs().mean() > 0.1  # not a degenerate (all-zero) comparison
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (shifted - expected).abs().max() > 1e-3  # the comparison is sensitive to t


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_state_dict_converts_to_diffusers(preset):
    """Every SD key/shape maps 1:1 onto diffusers' model of the same architecture (meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ours = UNet.from_preset(preset)
        dcfg = diffusers_config(ours.config)
        ref = UNet2DConditionModel(**dcfg)
    sd = ours.state_dict()
    converted = to_diffusers_state_dict(sd, dcfg)
    assert len(converted) == len(sd)
    expected = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == expected


def test_sd_key_names():
    with torch.device("meta"):
        sd = UNet.from_preset("sd15").state_dict()
        sd2 = UNet.from_preset("sd21").state_dict()
    assert len(sd) == 686
    shapes = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.0.bias": (320,),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.norm.weight": (320,),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
        "input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.out_layers.3.bias": (1280,),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert "input_blocks.1.0.skip_connection.weight" not in sd  # identity skip has no params
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in sd
    assert tuple(sd2["input_blocks.1.1.proj_in.weight"].shape) == (320, 320)  # Linear in SD2
    assert tuple(sd2["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (320, 1024)


# -----------------------------------------------------------------------------
# presets and config


@pytest.mark.parametrize("preset, expected", [("sd15", 859_520_964), ("sd21", 865_910_724), ("sd21-base", 865_910_724)])
def test_param_counts(preset, expected):
    with torch.device("meta"):
        model = UNet.from_preset(preset)
    assert n_params(model) == expected


def test_small_presets_sizes():
    with torch.device("meta"):
        tiny, small = UNet.from_preset("tiny"), UNet.from_preset("small")
        inpaint = UNet.from_preset("sd15-inpaint")
    assert n_params(tiny) < 2_000_000
    assert 2_000_000 < n_params(small) < 6_000_000
    assert inpaint.input_blocks[0][0].in_channels == 9


@pytest.mark.parametrize("preset", sorted(UNET_PRESETS))
def test_presets_resblocks_see_the_timestep(preset):
    """A ResBlock with one channel per GroupNorm group cancels the timestep embedding (see presets)."""
    with torch.device("meta"):
        model = UNet.from_preset(preset)
    for m in model.modules():
        if isinstance(m, unet_mod.ResBlock):
            norm = m.out_layers[0]
            assert norm.num_channels // norm.num_groups >= 2


def test_tiny_output_depends_on_t_and_context():
    model = randomize_(UNet.from_preset("tiny")).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        out = model(x, 10, ctx)
        assert (model(x, 900, ctx) - out).abs().max() > 1e-2
        assert (model(x, 10, torch.randn(1, 5, 32)) - out).abs().max() > 1e-2


def test_unknown_preset():
    with pytest.raises(ValueError, match="nope") as e:
        UNet.from_preset("nope")
    for name in UNET_PRESETS:
        assert name in str(e.value)


def test_config_roundtrip_and_overrides():
    model = UNet.from_preset("tiny", context_dim=48)
    cfg = json.loads(json.dumps(model.config))
    assert cfg["context_dim"] == 48
    clone = UNet(**cfg)
    a, b = model.state_dict(), clone.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert UNET_PRESETS["tiny"]["context_dim"] == 32  # presets are not mutated


def test_bad_spatial_size():
    model = UNet.from_preset("tiny")  # one downsample: H, W must be even
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 4, 8, 7), 10, torch.randn(1, 3, 32))
    with torch.device("meta"):
        sd15 = UNet.from_preset("sd15")
    with pytest.raises(ValueError, match="divisible by 8"):
        sd15(torch.randn(1, 4, 36, 36, device="meta"), 10, torch.randn(1, 77, 768, device="meta"))


# -----------------------------------------------------------------------------
# training features


def test_gradient_checkpointing_matches(monkeypatch):
    calls = []
    real = unet_mod.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(unet_mod, "checkpoint", counting_checkpoint)
    model = randomize_(UNet.from_preset("tiny")).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    t = torch.tensor([10.0, 900.0])

    def run():
        model.zero_grad()
        ctx.grad = None
        out = model(x, t, ctx)
        (out**2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.detach(), grads, ctx.grad.clone()

    model.gradient_checkpointing = False
    out0, grads0, cgrad0 = run()
    assert calls == []
    model.gradient_checkpointing = True
    out1, grads1, cgrad1 = run()
    n_blocks = len(model.input_blocks) + 1 + len(model.output_blocks)
    assert calls == [False] * n_blocks
    torch.testing.assert_close(out1, out0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cgrad1, cgrad0, atol=1e-6, rtol=1e-6)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], atol=1e-6, rtol=1e-6, msg=n)
    model.eval()  # no checkpointing outside training
    with torch.no_grad():
        model(x, t, ctx)
    assert len(calls) == n_blocks


def test_compile_fullgraph_eager_backend():
    """Dynamo traces the whole forward without graph breaks (fast: no code generation)."""
    model = randomize_(UNet.from_preset("tiny")).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, torch.tensor([3.0, 4.5]), ctx), model(x, torch.tensor([3.0, 4.5]), ctx))
        torch.testing.assert_close(compiled(x, 7, ctx), model(x, 7, ctx))


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    model = randomize_(UNet.from_preset("tiny")).eval()
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([3.0, 4.5])
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, ctx), model(x, t, ctx), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_sd15_forward_cpu():
    torch.manual_seed(0)
    model = UNet.from_preset("sd15").eval()
    x, ctx = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)
    start = time.time()
    with torch.no_grad():
        out = model(x, torch.tensor([999]), ctx)
    print(f"sd15 forward 64x64 on CPU: {time.time() - start:.1f}s")
    assert out.shape == (1, 4, 64, 64)
    assert torch.isfinite(out).all()
