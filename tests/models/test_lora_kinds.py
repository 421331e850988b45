"""LoHa, LoKr and DoRA modules against the reference implementations, for the same weights: LyCORIS's LohaModule /
LokrModule / LoConModule (the `lycoris-lora` package, test-only) and PEFT's LoraConfig(use_dora=True), on a Linear,
a 3x3 Conv2d and a 1x1 Conv2d. Outputs agree within 1e-5 (fp32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.models.lora import LoRAConfig, LoRAModule, module_from_parts
from ldm.models.lora_dora import DoRAModule
from ldm.models.lora_loha import LoHaModule
from ldm.models.lora_lokr import LoKrModule, factorization

lycoris = pytest.importorskip("lycoris")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(atol=1e-5, rtol=1e-5)


def layers():
    torch.manual_seed(0)
    return {"linear": nn.Linear(48, 40), "conv3": nn.Conv2d(24, 32, 3, padding=1, stride=2),
            "conv1": nn.Conv2d(40, 36, 1)}


def input_for(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 5, layer.in_features, generator=g)
    return torch.randn(2, layer.in_channels, 9, 9, generator=g)


def randomized(module: nn.Module, seed: int = 2) -> nn.Module:
    """Every parameter random (fresh adapters start at dW = 0, which would compare nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def ours_out(module, layer, x):
    with torch.no_grad():
        return layer(x) + module.delta(x, layer)


def lycoris_out(lyco, layer, x):
    lyco.apply_to()
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        lyco.restore()


def copy_named(ours: nn.Module, lyco: nn.Module) -> None:
    """Our LoHa / LoKr parameters carry LyCORIS's names: copy each into theirs."""
    theirs = dict(lyco.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            theirs[name].copy_(p)


@pytest.mark.parametrize("which", ["linear", "conv3", "conv1"])
def test_loha_equals_lycoris(which):
    from lycoris.modules.loha import LohaModule

    layer = layers()[which]
    ours = randomized(LoHaModule(layer, rank=3, alpha=5.0))
    lyco = LohaModule("x", layer, 1.0, lora_dim=3, alpha=5.0)
    copy_named(ours, lyco)
    x = input_for(layer)
    torch.testing.assert_close(ours_out(ours, layer, x), lycoris_out(lyco, layer, x), **TOL)
    # (LyCORIS 4.1's get_merged_weight applies alpha / r twice, get_weight's and get_diff_weight's: its forward is
    # the reference here)


@pytest.mark.parametrize("which", ["linear", "conv3", "conv1"])
@pytest.mark.parametrize("rank,factor,decompose_both", [(2, -1, False), (2, 4, True), (8, -1, False), (1, 2, True),
                                                        (64, -1, False)])
def test_lokr_equals_lycoris(which, rank, factor, decompose_both):
    from lycoris.modules.lokr import LokrModule

    layer = layers()[which]
    config = LoRAConfig(type="lokr", rank=rank, factor=factor, decompose_both=decompose_both)
    ours = randomized(LoKrModule.fresh(layer, rank, 3.0, config))
    lyco = LokrModule("x", layer, 1.0, lora_dim=rank, alpha=3.0, factor=factor, decompose_both=decompose_both)
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in lyco.named_parameters()}  # LyCORIS's factor shapes
    assert float(ours.scale) == pytest.approx(lyco.scale)
    copy_named(ours, lyco)
    x = input_for(layer)
    torch.testing.assert_close(ours_out(ours, layer, x), lycoris_out(lyco, layer, x), **TOL)


def test_factorization_is_lycoris_rule():
    from lycoris.functional import factorization as theirs

    for dim in (1, 2, 7, 32, 40, 127, 128, 250, 320, 360, 512, 640, 768, 1024, 1280, 2048):
        for factor in (-1, 1, 2, 4, 8, 16, 3):
            assert factorization(dim, factor) == theirs(dim, factor), (dim, factor)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("which", ["linear", "conv3"])
def test_dora_on_each_kind_equals_lycoris_weight_decompose(kind, which):
    """DoRA's W' = m (W + dW) / ||W + dW|| per output channel = LyCORIS's weight_decompose=True, wd_on_out=True."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    layer = layers()[which]
    config = LoRAConfig(type=kind, rank=2, alpha=3.0)
    inner = {"lora": LoRAModule.fresh, "loha": LoHaModule.fresh, "lokr": LoKrModule.fresh}[kind](layer, 2, 3.0,
                                                                                                  config)
    ours = randomized(DoRAModule.fresh(layer, inner))
    with torch.no_grad():
        ours.magnitude.abs_()
    cls = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[kind]
    lyco = cls("x", layer, 1.0, lora_dim=2, alpha=3.0, weight_decompose=True)
    parts = ours.parts()
    theirs = dict(lyco.named_parameters())
    with torch.no_grad():
        for name, value in parts.items():
            key = {"down": "lora_down.weight", "up": "lora_up.weight", "magnitude": "dora_scale"}.get(name, name)
            if key in theirs:
                theirs[key].copy_(value.reshape(theirs[key].shape))
    x = input_for(layer)
    torch.testing.assert_close(ours_out(ours, layer, x), lycoris_out(lyco, layer, x), **TOL)
    assert ours.algo == ("dora" if kind == "lora" else f"{kind}+dora")


def test_dora_per_input_channel_as_older_lycoris_files():
    """LyCORIS's wd_on_out=False (its earlier default): a (1, in, ...) dora_scale decomposes per input channel."""
    from lycoris.modules.locon import LoConModule

    for layer in (layers()["linear"], layers()["conv3"]):
        lyco = randomized(LoConModule("x", layer, 1.0, lora_dim=2, alpha=1.0, weight_decompose=True,
                                      wd_on_out=False))
        with torch.no_grad():
            lyco.dora_scale.abs_()
        sd = {k: v for k, v in lyco.state_dict().items()}
        parts = {"down": sd["lora_down.weight"], "up": sd["lora_up.weight"], "alpha": sd["alpha"],
                 "magnitude": sd["dora_scale"]}
        ours = module_from_parts(layer, parts)
        assert ours.axis == "in"
        x = input_for(layer)
        torch.testing.assert_close(ours_out(ours, layer, x), lycoris_out(lyco, layer, x), **TOL)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(24, 20)
        self.conv = nn.Conv2d(20, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(self.fc(x).permute(0, 3, 1, 2))


@pytest.mark.parametrize("which", ["fc", "conv"])
def test_dora_equals_peft_use_dora_outputs_and_gradients(which):
    """PEFT LoraConfig(use_dora=True) on a Linear and a Conv2d: the same output and the same gradients for A, B and
    the magnitude (both treat the norm as a constant, the DoRA paper's sec. 4.3; gradients within 1e-4)."""
    peft = pytest.importorskip("peft")
    model = TwoLayers()
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(TwoLayers(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=[which],
                                                                 use_dora=True, init_lora_weights=False))
    wrapped = getattr(peft_model.base_model.model, which)
    base = getattr(model, which)
    with torch.no_grad():
        magnitude = wrapped.lora_magnitude_vector["default"].weight
        magnitude.mul_(1.1)  # a trained magnitude, not the initial ||W + dW||
    parts = {"down": wrapped.lora_A["default"].weight, "up": wrapped.lora_B["default"].weight, "alpha": 5.0,
             "magnitude": magnitude.detach().reshape(-1, *[1] * (base.weight.ndim - 1))}
    ours = module_from_parts(base, {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in parts.items()})
    assert isinstance(ours, DoRAModule) and ours.axis == "out"
    x = torch.randn(2, 6, 6, 24, generator=torch.Generator().manual_seed(4))
    inp = x if which == "fc" else model.fc(x).detach().permute(0, 3, 1, 2)
    theirs = wrapped(inp)
    mine = base(inp) + ours.delta(inp, base)
    torch.testing.assert_close(mine, theirs, **TOL)
    theirs.square().sum().backward()
    mine.square().sum().backward()
    grad_tol = dict(atol=1e-4, rtol=1e-4)  # sums over the whole output: float32 rounding of O(1) gradients
    torch.testing.assert_close(ours.adapter.down.weight.grad, wrapped.lora_A["default"].weight.grad, **grad_tol)
    torch.testing.assert_close(ours.adapter.up.weight.grad, wrapped.lora_B["default"].weight.grad, **grad_tol)
    torch.testing.assert_close(ours.magnitude.grad.flatten(), magnitude.grad.flatten(), **grad_tol)


def test_fresh_adapters_start_at_the_base_and_bad_parts_fail():
    for which, layer in layers().items():
        x = input_for(layer)
        for kind in ("lora", "loha", "lokr", "dora"):
            from ldm.models.lora import new_module

            module = new_module(layer, LoRAConfig(type=kind, rank=2), 2, None)
            torch.testing.assert_close(module.delta(x, layer), torch.zeros_like(layer(x)), atol=1e-6, rtol=0)
    layer = layers()["linear"]
    good = randomized(LoHaModule(layer, 2)).parts()
    with pytest.raises(ValueError, match="blocks.0: hada_w2_b is"):
        module_from_parts(layer, {**good, "hada_w2_b": torch.zeros(2, 47)}, "blocks.0")
    lokr = LoKrModule.fresh(layer, 2, None, LoRAConfig(type="lokr")).parts()
    with pytest.raises(ValueError, match="does not divide"):
        module_from_parts(layer, {**lokr, "lokr_w1": torch.zeros(7, 5)})
    with pytest.raises(ValueError, match="DoRA magnitude"):
        module_from_parts(layer, {**LoRAModule(layer, 2).parts(), "magnitude": torch.ones(40, 2)})
    with pytest.raises(ValueError, match="adapter.type"):
        LoRAConfig(type="oft")
    with pytest.raises(ValueError, match="adapter.factor"):
        LoRAConfig(type="lokr", factor=0)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_cp_tucker_files_equal_lycoris(kind):
    """A LyCORIS use_tucker=True LoHa / LoKr on a 3x3 conv (hada_t1 / hada_t2, lokr_t2), read from its state dict."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    layer = layers()["conv3"]
    if kind == "loha":
        lyco = LohaModule("x", layer, 1.0, lora_dim=3, alpha=2.0, use_tucker=True)
    else:
        lyco = LokrModule("x", layer, 1.0, lora_dim=2, alpha=2.0, use_tucker=True, factor=4)
    randomized(lyco)
    parts = {k: v for k, v in lyco.state_dict().items() if k != "scalar"}
    assert any(k in parts for k in ("hada_t1", "lokr_t2"))
    ours = module_from_parts(layer, parts)
    assert {k: tuple(v.shape) for k, v in ours.parts().items()} == {k: tuple(v.shape) for k, v in parts.items()}
    x = input_for(layer)
    torch.testing.assert_close(ours_out(ours, layer, x), lycoris_out(lyco, layer, x), **TOL)
