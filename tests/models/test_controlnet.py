"""ControlNet: residuals equal diffusers' ControlNetModel (SD 1.x, 2.x and SDXL shapes) with weights mapped both ways
through ldm.formats.controlnet_file, the U-Net adds them like diffusers' UNet2DConditionModel, and a fresh ControlNet
(zero convs) leaves the U-Net's output unchanged."""

import pytest
import torch

from ldm.formats.controlnet_file import controlnet_diffusers_config, controlnet_from_diffusers, controlnet_to_diffusers
from ldm.formats.diffusers_keys import unet_diffusers_config, unet_ldm_to_diffusers
from ldm.models.controlnet import ControlNet, ControlNetConfig, unet_encoder_state
from ldm.models.sdxl_conditioning import sdxl_vector, size_values
from ldm.models.unet import UNet

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")

POOLED = 16
SHAPES = {
    "sd1": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=2,
                context_dim=24),
    "sd2": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(1,), num_heads=-1,
                num_head_channels=16, use_linear_projection=True, context_dim=24),
    "sdxl": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                 transformer_depth=(0, 1, 2), num_heads=-1, num_head_channels=16, use_linear_projection=True,
                 context_dim=24, adm_in_channels=POOLED + 6 * 256),
}
HINT = (8, 16)  # one stride-2 step: the control image is 2x the latent


@torch.no_grad()
def randomize_(model, seed=0):
    """Every parameter (zero convs included) seeded random, so no comparison is between zeros."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        p.copy_(r / p[0].numel() ** 0.5 if p.ndim >= 2 else (1 + 0.2 * r if "norm" in name and name.endswith(
            "weight") else 0.2 * r))
    return model.eval()


def inputs(style, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 5, 24, generator=g)
    hint = torch.rand(batch, 3, 16, 16, generator=g)
    extra, added = {}, {}
    if style == "sdxl":
        pooled = torch.randn(batch, POOLED, generator=g)
        values = size_values(torch.tensor([[64, 48]] * batch), torch.tensor([[0, 8]] * batch),
                             torch.tensor([[64, 64]] * batch))
        extra = {"y": sdxl_vector(pooled, values)}
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": values}}
    return x, ctx, hint, extra, added


def reference(net):
    from diffusers import ControlNetModel

    cfg = {k: v for k, v in controlnet_diffusers_config(net.config).items() if not k.startswith("_")}
    ref = ControlNetModel(**cfg).eval()
    ref.load_state_dict(controlnet_to_diffusers(net.state_dict(), net.config), strict=True)
    return ref


@pytest.mark.parametrize("style", sorted(SHAPES))
def test_residuals_equal_diffusers_controlnet(style):
    net = randomize_(ControlNet(**SHAPES[style], hint_channels=HINT))
    ref = reference(net)
    x, ctx, hint, extra, added = inputs(style)
    t = torch.tensor([3, 811])
    with torch.no_grad():
        down, mid = net(x, t, ctx, hint, scale=0.7, **extra)
        ref_down, ref_mid = ref(x, t, ctx, hint, conditioning_scale=0.7, return_dict=False, **added)
    assert len(down) == len(ref_down) == len(net.input_blocks)
    for ours, theirs in zip(down, ref_down):
        assert ours.abs().mean() > 1e-2
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mid, ref_mid, atol=1e-5, rtol=1e-5)
    # and back: diffusers' names -> ours is the exact inverse
    back = controlnet_from_diffusers(ref.state_dict(), net.config)
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_unet_adds_residuals_like_diffusers(style):
    from diffusers import UNet2DConditionModel

    unet = randomize_(UNet(**SHAPES[style]), seed=3)
    ref = UNet2DConditionModel(**{k: v for k, v in unet_diffusers_config(unet.config).items()
                                  if not k.startswith("_")}).eval()
    ref.load_state_dict(unet_ldm_to_diffusers(unet.state_dict(), unet.config), strict=True)
    net = randomize_(ControlNet.from_unet(unet, hint_channels=HINT), seed=4)
    x, ctx, hint, extra, added = inputs(style)
    with torch.no_grad():
        control = net(x, 500, ctx, hint, **extra)
        out = unet(x, 500, ctx, control=control, **extra)
        expected = ref(x, 500, ctx, down_block_additional_residuals=tuple(control[0]),
                       mid_block_additional_residual=control[1], **added).sample
        plain = unet(x, 500, ctx, **extra)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - plain).abs().max() > 1e-2  # the residuals matter


def test_from_unet_copies_the_encoder_and_starts_as_no_change():
    unet = randomize_(UNet(**SHAPES["sd1"]), seed=5)
    net = ControlNet.from_unet(unet, hint_channels=HINT)
    state = net.state_dict()
    copied = unet_encoder_state(unet)
    assert copied and all(torch.equal(state[k], v) for k, v in copied.items())
    zero = [k for k in state if k.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.6."))]
    assert zero and all(not state[k].any() for k in zero)
    x, ctx, hint, _, _ = inputs("sd1")
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 10, ctx, control=net(x, 10, ctx, hint)), unet(x, 10, ctx))


def test_controlnet_errors_name_the_fix():
    net = ControlNet(**SHAPES["sd1"], hint_channels=HINT)
    x, ctx, hint, _, _ = inputs("sd1")
    with pytest.raises(ValueError, match="control image of shape"):
        net(x, 10, ctx, hint[..., :8, :8])
    unet = UNet(**SHAPES["sd1"])
    with pytest.raises(ValueError, match="residuals for the U-Net's"):
        unet(x, 10, ctx, control=([], torch.zeros(1)))
    with pytest.raises(ValueError, match="hint_channels"):
        ControlNetConfig(hint_channels=())
