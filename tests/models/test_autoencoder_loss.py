import math

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm.models.autoencoder_loss import AutoencoderLoss, NLayerDiscriminator, hinge_d_loss


def _batch(seed: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g) * 2 - 1


def test_reconstruction_and_kl_terms():
    x = _batch()
    recon = torch.zeros_like(x)
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    loss_fn = AutoencoderLoss(kl_weight=1e-3)
    loss, logs = loss_fn.generator_loss(x, recon, post, global_step=0)
    expected = x.abs().flatten(1).sum(1).mean() + 1e-3 * post.kl().mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["rec_loss"], x.abs().mean())

    l2 = AutoencoderLoss(rec_loss="l2", kl_weight=0.0)
    l2_loss = l2.generator_loss(x, recon, post, 0)[0]
    torch.testing.assert_close(l2_loss, x.square().flatten(1).sum(1).mean())
    with pytest.raises(ValueError):
        AutoencoderLoss(rec_loss="huber")


def test_perceptual_hook_is_added_per_pixel():
    x = _batch()
    post = DiagonalGaussian(torch.zeros(2, 8, 4, 4))
    perceptual = lambda a, b: torch.tensor([1.0, 3.0])  # noqa: E731
    base = AutoencoderLoss(kl_weight=0.0).generator_loss(x, x, post, 0)[0]
    with_p = AutoencoderLoss(kl_weight=0.0, perceptual=perceptual, perceptual_weight=0.5)
    loss = with_p.generator_loss(x, x, post, 0)[0]
    torch.testing.assert_close(loss - base, torch.tensor(0.5 * 2.0 * x[0].numel()))


def test_few_steps_reduce_reconstruction():
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny")
    loss_fn = AutoencoderLoss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.nn.functional.interpolate(_batch(1, size=4), size=16, mode="bilinear")  # smooth
    history = []
    for step in range(8):
        recon, post = model(x, generator=torch.Generator().manual_seed(step))
        loss, logs = loss_fn.generator_loss(x, recon, post, step, model.get_last_layer())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logs["rec_loss"].item())
    assert history[-1] < 0.75 * history[0], history


def test_discriminator_path_and_adaptive_weight():
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny")
    loss_fn = AutoencoderLoss(
        use_discriminator=True, disc_start=2, disc_channels=16, disc_num_layers=2
    )
    x = _batch(2, size=32)

    # Before disc_start: no GAN term, discriminator loss is zero (but differentiable).
    recon, post = model(x)
    loss, logs = loss_fn.generator_loss(x, recon, post, 1, model.get_last_layer())
    assert logs["g_loss"].item() == 0.0 and logs["disc_factor"].item() == 0.0
    d_loss, _ = loss_fn.discriminator_loss(x, recon, 1)
    assert d_loss.item() == 0.0 and d_loss.requires_grad

    # After disc_start: adaptive weight is finite and positive, both losses backprop.
    loss, logs = loss_fn.generator_loss(x, recon, post, 2, model.get_last_layer())
    assert math.isfinite(logs["d_weight"].item()) and logs["d_weight"].item() > 0
    assert logs["disc_factor"].item() == 1.0
    expected = logs["nll_loss"] + 1e-6 * logs["kl_loss"] + logs["d_weight"] * logs["g_loss"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert model.decoder.conv_out.weight.grad is not None

    d_loss, d_logs = loss_fn.discriminator_loss(x, recon, 2)
    assert d_loss.item() > 0 and math.isfinite(d_loss.item())
    loss_fn.discriminator.zero_grad()
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())

    # Eval without a graph: GAN weight falls back to 0 instead of raising.
    with torch.no_grad():
        recon, post = model(x)
        _, logs = loss_fn.generator_loss(x, recon, post, 2, model.get_last_layer())
    assert logs["d_weight"].item() == 0.0


def test_nlayer_discriminator_layout_and_hinge():
    d = NLayerDiscriminator()  # taming defaults (3 -> 64 -> 128 -> 256 -> 512 -> 1)
    convs = 3 * 64 * 16 + 64 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 512 * 16 + 1
    norms = 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in d.parameters()) == convs + norms == 2_765_633
    keys = set(d.state_dict())
    assert {"main.0.weight", "main.2.weight", "main.3.running_mean", "main.11.bias"} <= keys
    assert d(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.5 + 0.5)))
