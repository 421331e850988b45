"""model.quantize_base: a frozen base stored as int8 / NF4 / fp8 (ldm/models/quantized_base.py) computes what its
dequantized weights compute, stays close to the fp32 network, stores the expected fraction of the bytes, and LoRA
trains on it while it stays unchanged and quantized."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.formats.lora_files import save_lora_file
from ldm.models.lora import LoRAConfig, LoRANetwork, is_adaptable
from ldm.models.quantized_base import (PRECISIONS, base_precision, base_precision_metadata, dequantize_,
                                       is_quantized, quantize_base_, stored_bytes)
from ldm.models.unet import UNet
from tests.helpers.models import randomize

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


def linear(in_features=256, out_features=96, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=0.05)
    return layer


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantized_linear_is_its_dequantized_weight_within_the_formats_step(precision):
    layer = linear()
    seq = nn.Sequential(copy.deepcopy(layer))
    assert quantize_base_(seq, precision) == 1
    q = seq[0]
    assert is_quantized(q) and is_adaptable(q) and q.weight.element_size() == 1 and not q.weight.requires_grad
    x = torch.randn(5, 256)
    w = q.dequantized_weight()
    torch.testing.assert_close(q(x), F.linear(x, w, layer.bias), atol=1e-5, rtol=1e-5)
    err, rowmax = (w - layer.weight).abs(), layer.weight.abs().amax(1, keepdim=True)
    if precision == "int8":  # the nearest of 255 levels of the row's absmax: half a step (bitsandbytes scales
        assert (err <= rowmax / 127 * 0.6).all()  # through fp16 on the CPU: measured 0.53 of a step at most)
    elif precision == "fp8":  # e4m3: 3 mantissa bits, relative rounding error <= 2^-4 (subnormals: absolute)
        assert (err <= layer.weight.abs() * 2 ** -4 + rowmax / 448 * 2 ** -9).all()
    else:  # NF4 blocks of 64: the widest gap of the code book is 1 - 0.7230 (QLoRA app. E), half of it x the block's
        # absmax (0.139), which is itself stored in 8 bits (double quantization): measured 0.156 at most
        block_max = layer.weight.reshape(-1, 64).abs().amax(1, keepdim=True)
        assert (err.reshape(-1, 64) <= block_max * 0.17).all()
    assert err.max() > 0  # it is quantized


@pytest.mark.parametrize("precision, tolerance", [("int8", 0.01), ("fp8", 0.03), ("nf4", 0.06)])
def test_quantized_unet_forward_is_close_to_fp32(precision, tolerance):
    """Relative L2 error of the whole tiny U-Net's output (50 Linear layers quantized; measured: int8 0.17%,
    fp8 0.6%, NF4 2.0% with N(0, 0.1) weights)."""
    unet = randomize(UNet.from_preset("tiny"), 1).eval()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = unet(x, t, c)
        quantize_base_(unet, precision)
        out = unet(x, t, c)
    assert base_precision(unet) == precision
    assert 0 < ((out - ref).norm() / ref.norm()).item() < tolerance


@pytest.mark.parametrize("precision, bytes_per_weight", [("int8", 1 + 4 / 512), ("fp8", 1 + 4 / 512),
                                                          ("nf4", 0.5 + 1 / 64 + 4 * 4 / (64 * 256))])
def test_stored_base_is_smaller_by_the_expected_factor(precision, bytes_per_weight):
    """int8 / fp8: 1 byte a weight + one fp32 scale a row (of 512); NF4: half a byte + one int8 absmax per block of
    64 + one fp32 absmax per 256 blocks (double quantization, QLoRA sec. 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(4)])
    before = stored_bytes(model)
    assert before == 4 * 512 * 512 * 4
    quantize_base_(model, precision)
    expected = 4 * 512 * 512 * bytes_per_weight
    assert stored_bytes(model) == pytest.approx(expected, rel=0.01, abs=4 * 1100)  # + the small code books
    assert before / stored_bytes(model) > (3.9 if precision != "nf4" else 7.4)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_lora_trains_on_a_quantized_base_that_stays_unchanged(precision):
    torch.manual_seed(0)
    unet = randomize(UNet.from_preset("tiny"), 1)
    teacher = copy.deepcopy(unet).eval()  # the fp32 base with a random adapter: a target LoRA can reach
    plain = LoRANetwork.build({"unet": teacher}, LoRAConfig(preset="attention_ff", rank=4)).attach({"unet": teacher})
    for lora in plain.loras.values():
        torch.nn.init.normal_(lora.up.weight, std=0.3)
    x, t, c = torch.randn(4, 4, 8, 8), torch.tensor([3, 200, 500, 900]), torch.randn(4, 77, 32)
    with torch.no_grad():
        target = teacher(x, t, c)
    quantize_base_(unet, precision)
    unet.requires_grad_(False)
    net = LoRANetwork.build({"unet": unet}, LoRAConfig(preset="attention_ff", rank=4)).attach({"unet": unet})
    assert set(net.loras) == set(plain.loras)  # the same layers are adapted, by the same names
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(unet(x, t, c), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    state = unet.state_dict()
    assert state.keys() == base.keys() and all(torch.equal(state[k], v) for k, v in base.items())
    assert base_precision(unet) == precision and all(p.grad is None for p in unet.parameters())

    # merged into a dequantized copy (what the run's sampling bundle and export do) = applied on the base
    merged = dequantize_(copy.deepcopy(unet))  # deepcopy drops no hook: net's hooks stay on `unet`
    for module in merged.modules():
        module._forward_hooks.clear()
    assert base_precision(merged) == "fp32"
    net.merge_into({"unet": merged})
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, c), unet(x, t, c), atol=1e-4, rtol=1e-4)


def test_adapter_file_records_the_base_precision(tmp_path):
    from safetensors import safe_open

    unet = randomize(UNet.from_preset("tiny"), 1)
    net = LoRANetwork.build({"unet": unet}, LoRAConfig(preset="attention", rank=2))
    for precision, fp8 in (("fp32", "False"), ("nf4", "False"), ("fp8", "True")):
        roots = {"unet": copy.deepcopy(unet)}
        if precision != "fp32":
            quantize_base_(roots["unet"], precision)
        path = save_lora_file(net, roots, tmp_path / f"{precision}.safetensors")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["ldm_base_precision"] == f"unet={precision}"
        assert meta["ss_fp8_base"] == fp8 and meta["ss_fp8_base_unet"] == "False"
    assert base_precision_metadata({"unet": roots["unet"], "text_encoder": unet}) == {
        "ldm_base_precision": "unet=fp8 text_encoder=fp32", "ss_fp8_base": "False", "ss_fp8_base_unet": "True"}


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="quantize_base must be null or one of"):
        quantize_base_(nn.Sequential(nn.Linear(4, 4)), "int4")
