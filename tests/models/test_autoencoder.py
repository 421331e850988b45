import json

import pytest
import torch

from ldm.models.autoencoder import (
    AUTOENCODER_PRESETS,
    AutoencoderKL,
    DiagonalGaussian,
    IdentityAutoencoder,
)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter a distinct random value (GroupNorm affine included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 1:  # norm scale: keep near 1
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


# --------------------------------------------------------------------------- #
# Parity with diffusers (test-only reference)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "kwargs, size",
    [
        (dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4), 16),
        (dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, latent_channels=3), 16),
        (dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=8), 16),
    ],
    ids=["tiny-2level", "3level", "shapes-8-groups"],
)
def test_parity_with_diffusers(kwargs, size):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = AutoencoderKL(**kwargs).eval()
    _randomize(ours, seed=1)

    n = len(kwargs["channel_mult"])
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(kwargs["base_channels"] * m for m in kwargs["channel_mult"]),
        layers_per_block=kwargs["num_res_blocks"],
        latent_channels=kwargs["latent_channels"],
        norm_num_groups=kwargs.get("norm_groups", 32),
        sample_size=size,
    )
    ckpt = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(ckpt, config)
    ref = diffusers.AutoencoderKL(**config).eval()
    ref.load_state_dict(converted, strict=True)
    assert len(converted) == len(ours.state_dict())

    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        post = ours.encode(x)
        ref_post = ref.encode(x).latent_dist
        f = ours.downsample_factor
        assert post.mean.shape == (2, kwargs["latent_channels"], size // f, size // f)
        torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.logvar, ref_post.logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.std, ref_post.std, atol=1e-5, rtol=1e-5)

        z = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        out = ours.decode(z)
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_state_dict_layout_matches_original_names():
    m = AutoencoderKL.from_preset("tiny")
    keys = set(m.state_dict())
    for k in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.mid.block_2.conv2.bias",
        "encoder.norm_out.bias",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",  # level 0: 64 -> 32 channels
        "decoder.up.1.block.1.conv2.weight",  # num_res_blocks + 1 blocks
        "decoder.up.1.upsample.conv.weight",
        "decoder.conv_out.weight",
    ]:
        assert k in keys, k
    assert "encoder.down.1.downsample.conv.weight" not in keys  # last level
    assert "decoder.up.0.upsample.conv.weight" not in keys  # level 0
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in keys  # no width change
    assert "decoder.up.0.block.1.nin_shortcut.weight" not in keys
    assert m.encoder.conv_out.out_channels == 2 * m.latent_channels
    assert m.decoder.up[1].block[0].conv1.in_channels == 64


# --------------------------------------------------------------------------- #
# Presets / config
# --------------------------------------------------------------------------- #


def test_sd_preset_param_count_on_meta():
    with torch.device("meta"):
        m = AutoencoderKL.from_preset("sd")
    assert sum(p.numel() for p in m.parameters()) == 83_653_863
    assert m.downsample_factor == 8
    assert m.latent_channels == 4
    assert m.scaling_factor == 0.18215


def test_presets_config_and_errors():
    tiny = AutoencoderKL.from_preset("tiny", scaling_factor=0.5)
    assert tiny.downsample_factor == 2
    assert tiny.scaling_factor == 0.5
    rebuilt = AutoencoderKL(**json.loads(json.dumps(tiny.config)))
    assert rebuilt.config == tiny.config
    with torch.device("meta"):
        small = AutoencoderKL.from_preset("small")
    assert small.downsample_factor == 4 and small.latent_channels == 4
    assert 1_000_000 <= sum(p.numel() for p in small.parameters()) <= 3_000_000
    assert {"sd", "tiny", "small"} <= set(AUTOENCODER_PRESETS)
    with pytest.raises(ValueError, match="nope.*available.*tiny"):
        AutoencoderKL.from_preset("nope")


# --------------------------------------------------------------------------- #
# Posterior
# --------------------------------------------------------------------------- #


def test_logvar_clamped():
    mean = torch.zeros(1, 2, 1, 1)
    logvar = torch.tensor([-100.0, 100.0]).reshape(1, 2, 1, 1)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    torch.testing.assert_close(post.var, torch.exp(post.logvar))


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 4, 2, 2, generator=g) * 2
    post = DiagonalGaussian(moments)
    q = torch.distributions.Normal(post.mean, post.std)
    p = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=[1, 2, 3])
    torch.testing.assert_close(post.kl(), expected)
    assert post.kl().shape == (3,)

    x = torch.randn(post.mean.shape, generator=g)
    torch.testing.assert_close(post.nll(x), -q.log_prob(x).sum(dim=[1, 2, 3]))


def test_sample_uses_generator_and_mode_is_mean():
    post = DiagonalGaussian(torch.randn(2, 8, 3, 3))
    a = post.sample(torch.Generator().manual_seed(5))
    b = post.sample(torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, post.mode())
    assert post.mode() is post.mean


# --------------------------------------------------------------------------- #
# Diffusion-facing API
# --------------------------------------------------------------------------- #


def test_encode_decode_latents_scaling_and_shift():
    torch.manual_seed(0)
    m = AutoencoderKL.from_preset("tiny", scaling_factor=0.3, shift_factor=0.1).eval()
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        post = m.encode(x)
        z = m.encode_latents(x, sample=False)
        torch.testing.assert_close(z, (post.mode() - 0.1) * 0.3)
        torch.testing.assert_close(m.decode_latents(z), m.decode(post.mode()), atol=1e-5, rtol=1e-5)
        g = torch.Generator().manual_seed(7)
        zs = m.encode_latents(x, generator=g)
        torch.testing.assert_close(zs, (post.sample(torch.Generator().manual_seed(7)) - 0.1) * 0.3)
        recon, post2 = m(x, sample_posterior=False)
        torch.testing.assert_close(recon, m.decode(post.mean))
    assert z.shape == (1, 4, 4, 4)


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    m = AutoencoderKL.from_preset("tiny").train()
    x = torch.rand(1, 3, 8, 8) * 2 - 1

    def grads():
        m.zero_grad()
        recon, post = m(x, generator=torch.Generator().manual_seed(0))
        (recon.square().mean() + post.kl().mean()).backward()
        return [p.grad.clone() for p in m.parameters()]

    ref = grads()
    m.gradient_checkpointing = True
    assert m.config["gradient_checkpointing"] is True
    for a, b in zip(ref, grads()):
        torch.testing.assert_close(a, b)


def test_identity_autoencoder_round_trip():
    ae = IdentityAutoencoder()
    x = torch.rand(2, 3, 5, 5) * 2 - 1
    assert torch.equal(ae.encode_latents(x), x)
    assert torch.equal(ae.decode_latents(ae.encode_latents(x)), x)
    assert ae.downsample_factor == 1 and ae.latent_channels == 3
    json.dumps(ae.config)
    scaled = IdentityAutoencoder(in_channels=1, scaling_factor=2.0)
    x1 = torch.rand(2, 1, 4, 4)
    assert torch.equal(scaled.encode_latents(x1), 2.0 * x1)
    assert torch.equal(scaled.decode_latents(scaled.encode_latents(x1)), x1)
    assert scaled.latent_channels == 1
