"""model.quantize_base with adapter=lora: the run trains the adapter on an NF4 / int8 base that stays quantized and
unchanged, writes the base's precision into the adapter file, resumes exactly, and refuses a quantized base
without an adapter."""

import pytest
import torch
from safetensors import safe_open

import lightning as L
from ldm.formats.lora_files import read_lora_file
from ldm.models.quantized_base import base_precision
from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.training import CKPT, assert_same_run, logged_losses
from tests.helpers.training import base  # noqa: F401 - the trained tiny base fixture

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_on_an_nf4_base_trains_and_records_the_base(tiny_cfg, base, tmp_path):
    cfg = tiny_cfg(base, "adapter=lora", "adapter.preset=attention_ff", "adapter.text_encoder=true",
                   "model.quantize_base=nf4", "optim.lr=1e-2", "trainer.max_steps=4", *CKPT)
    L.seed_everything(cfg.seed)
    module = build_diffusion_module(cfg)
    assert base_precision(module.unet) == "nf4" and base_precision(module.text_encoder) == "nf4"
    assert len(module.lora.loras) > 0
    before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    result = train(cfg)
    losses = [loss for _, loss in logged_losses(tmp_path / "run")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    assert all(k.startswith(("lora.", "ema.")) for k in ckpt["state_dict"])  # the quantized base is not saved
    with safe_open(str(tmp_path / "run" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ldm_base_precision"] == "unet=nf4 text_encoder=nf4"
    assert meta["ss_fp8_base"] == "False"
    # the file applies to the unquantized base too (the same layer names)
    L.seed_everything(cfg.seed)
    plain = build_diffusion_module(tiny_cfg(base, "adapter=lora", "adapter.preset=attention_ff"))
    lora = read_lora_file(tmp_path / "run" / "lora.safetensors", plain.adapter_roots())
    assert lora.unmapped == [] and len(lora.weights) == len(module.lora.loras)
    # a fresh quantized module is the same base (quantizing is deterministic), which is what resuming relies on
    L.seed_everything(cfg.seed)
    again = build_diffusion_module(cfg)
    state = again.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    # the run's checkpoint samples on the base it trained on: its Linear layers dequantized from NF4, not the fp32
    # base (time_embed.0 has no adapter: exactly the dequantized NF4 weight)
    from ldm.formats.load import load_bundle
    from ldm.models.quantized_base import dequantize_

    loaded = load_bundle(result["last_checkpoint"]).unet.state_dict()
    trained_on = dequantize_(again.unet).state_dict()
    assert torch.equal(loaded["time_embed.0.weight"], trained_on["time_embed.0.weight"])
    assert not torch.equal(loaded["time_embed.0.weight"], plain.unet.state_dict()["time_embed.0.weight"])


def test_quantized_base_needs_an_adapter_and_a_known_precision(tiny_cfg, base):
    with pytest.raises(ConfigError, match="model.quantize_base=int8 stores a frozen base: it needs an adapter"):
        build_diffusion_module(tiny_cfg(base, "model.quantize_base=int8"))
    with pytest.raises(ConfigError, match="model.quantize_base must be null or one of"):
        build_diffusion_module(tiny_cfg(base, "adapter=lora", "model.quantize_base=int4"))


@pytest.mark.parametrize("precision", ["int8", pytest.param("nf4", marks=pytest.mark.slow)])
def test_lora_on_a_quantized_base_stopped_and_resumed_equals_uninterrupted(tiny_cfg, base, tmp_path, precision):
    common = [base, "adapter=lora", "adapter.preset=attention_ff", f"model.quantize_base={precision}",
              "optim.lr=1e-2", "module.ema_decay=0.9", "trainer.val_check_interval=null",
              "trainer.limit_val_batches=0", "data.train.size=16", "trainer.max_steps=6", *CKPT,
              "+callbacks.checkpoint.every_n_train_steps=1", "+logger.csv.flush_logs_every_n_steps=1"]
    train(tiny_cfg(*common, f"paths.run_dir={tmp_path / 'reference'}"))
    stopped = [*common, f"paths.run_dir={tmp_path / 'resumed'}"]
    train(tiny_cfg(*stopped, "trainer.max_steps=3"))
    train(tiny_cfg(*stopped, "ckpt_path=last"))
    assert_same_run(tmp_path / "reference", tmp_path / "resumed")
    ref = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    res = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert ref.keys() == res.keys() and any(k.startswith("lora.") for k in ref)
    for k in ref:
        torch.testing.assert_close(ref[k], res[k], atol=1e-6, rtol=1e-6, msg=k)


@pytest.mark.parametrize("precision", ["int8", "nf4", "fp8"])
def test_a_run_on_a_quantized_base_samples(tiny_cfg, base, precision):  # noqa: F811
    """The in-training sample grid runs on the quantized base with the adapter applied (the sampler's dtype is the
    one the U-Net computes in, not its first stored weight's: int8 / uint8 / float8 here) and draws what the
    dequantized copy with the adapter merged draws."""
    from ldm.pipelines import text_to_image

    L.seed_everything(0)
    module = build_diffusion_module(tiny_cfg(base, "adapter=lora", f"model.quantize_base={precision}"))
    assert next(module.unet.parameters()).dtype not in (torch.float32, torch.float16, torch.bfloat16)
    with torch.no_grad():
        for p in module.lora.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        with module.sampling_bundle() as bundle:
            live = text_to_image(bundle, ["a red circle"], steps=3, height=16, width=16, seed=1)
        merged = text_to_image(module.bundle(), ["a red circle"], steps=3, height=16, width=16, seed=1)
    assert torch.isfinite(live).all() and (live - merged).abs().max() < 1e-3
