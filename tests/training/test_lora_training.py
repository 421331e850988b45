"""adapter=lora: the base stays frozen, only adapter weights are optimised and checkpointed, the run writes a kohya
file that reads back to what it trained, a stopped run resumes exactly, sampling callbacks see the adapter, and
training can start from a LoRA file."""

from pathlib import Path

import lightning as L
import pytest
import torch

from ldm.formats.lora_files import read_lora_file
from ldm.formats.detect import detect_source
from ldm.formats.load import load_bundle
from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.training import CKPT, stopped_and_resumed
from tests.helpers.training import base  # noqa: F401 - the trained tiny base fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_only_the_adapter_trains_and_is_saved(tiny_cfg, base):
    cfg = tiny_cfg(base, "adapter=lora", "adapter.preset=full", "adapter.rank=2", "adapter.conv_rank=3",
                   "adapter.unet_lr=2e-3", "module.ema_decay=0.9", *CKPT)
    L.seed_everything(cfg.seed)  # as train() does: the same random base each time
    module = build_diffusion_module(cfg)
    base = {k: v.clone() for k, v in module.unet.state_dict().items()}
    opt = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.lora.parameters()}
    assert [g["lr"] for g in opt.param_groups] == [2e-3]
    assert not any(p.requires_grad for p in module.unet.parameters())

    result = train(cfg)
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith(("lora.", "ema.")) for k in ckpt["state_dict"])
    assert ckpt["ldm"]["adapter"]["preset"] == "full"
    lora_file = Path(result["run_dir"]) / "lora.safetensors"
    # the file holds the EMA adapter; the checkpoint loads as the base with it merged
    assert detect_source(result["last_checkpoint"]) == "training_checkpoint"  # what sample.py / export read
    bundle = load_bundle(result["last_checkpoint"])
    L.seed_everything(cfg.seed)
    fresh = build_diffusion_module(cfg)
    assert all(torch.equal(base[k], v) for k, v in fresh.unet.state_dict().items())  # same (seeded) base
    lora = read_lora_file(lora_file, fresh.adapter_roots())
    assert lora.unmapped == [] and len(lora.weights) == len(fresh.lora.loras)
    ema = {k[len("ema.model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.model.")}
    raw = {k[len("lora."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("lora.")}
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if k.endswith("up.weight"))  # EMA differs from raw
    net = lora.network(fresh.adapter_roots())
    for key, m in net.loras.items():
        torch.testing.assert_close(m.up.weight, ema[f"loras.{key}.up.weight"])
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 77, 32)
    net.attach(fresh.adapter_roots())
    with torch.no_grad():
        # fresh.lora (zero up weights) adds nothing; net is the file's adapter
        torch.testing.assert_close(bundle.unet(x, t, c), fresh.unet(x, t, c), atol=1e-5, rtol=1e-5)


def test_text_encoder_adapter_trains_with_its_own_lr(tiny_cfg, base):
    cfg = tiny_cfg(base, "adapter=lora", "adapter.text_encoder=true", "adapter.unet_lr=1e-3",
                   "adapter.text_encoder_lr=5e-5", "module.ema_decay=null", *CKPT)
    L.seed_everything(cfg.seed)
    module = build_diffusion_module(cfg)
    opt = module.configure_optimizers()["optimizer"]
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("lora_unet", 1e-3), ("lora_text_encoder", 5e-5)]
    before = {k: v.clone() for k, v in module.lora.state_dict().items()}
    result = train(cfg)
    after = torch.load(result["last_checkpoint"], weights_only=True)["state_dict"]
    te_keys = [k for k in before if k.startswith("loras.te_") and k.endswith("up.weight")]
    assert te_keys and all(not torch.equal(before[k], after["lora." + k]) for k in te_keys)
    assert not any(k.startswith("text_encoder.") for k in after)  # the frozen encoder is not in the checkpoint


def test_sampling_callback_samples_with_the_adapter(tiny_cfg, base):
    from ldm.pipelines.common import SamplingOptions
    from ldm.training.callbacks.sampling import generate

    module = build_diffusion_module(tiny_cfg(base, "adapter=lora", "module.ema_decay=0.9"))
    ddim = SamplingOptions(name="ddim", steps=2)
    args = dict(prompts=["a red circle"], sampler=ddim, guidance_scale=2.0, seed=0, resolution=16)
    before = generate(module, **args)
    with torch.no_grad():
        for m in module.lora.loras.values():
            m.up.weight.normal_(std=0.5)
    assert torch.equal(generate(module, **args, use_ema=True), before)  # the EMA adapter is still zero
    raw = generate(module, **args, use_ema=False)
    assert (raw - before).abs().max() > 1e-3
    torch.testing.assert_close(generate(module, **args, use_ema=False), raw)  # nothing leaked between calls
    merged = module.bundle(use_ema=False)  # merged copy == hooks
    from ldm.pipelines import text_to_image

    torch.testing.assert_close(text_to_image(merged, args["prompts"], sampler=ddim, guidance_scale=2.0,
                                             seed=0, height=16, width=16), raw, atol=1e-5, rtol=1e-5)


def test_start_from_a_lora_file_and_bad_configs(tiny_cfg, tmp_path):
    from ldm.formats.lora_files import save_lora_file

    module = build_diffusion_module(tiny_cfg("adapter=lora"))
    with torch.no_grad():
        for m in module.lora.loras.values():
            m.up.weight.normal_()
    path = save_lora_file(module.lora, module.adapter_roots(), tmp_path / "start.safetensors", layout="peft")
    started = build_diffusion_module(tiny_cfg("adapter=lora", f"adapter.init_from={path.parent}"))
    for k, v in module.lora.state_dict().items():
        torch.testing.assert_close(started.lora.state_dict()[k], v)
    with pytest.raises(ConfigError, match="adapter.*preset"):
        build_diffusion_module(tiny_cfg("adapter=lora", "adapter.preset=everything"))
    with pytest.raises(ConfigError, match="adapter.*rank"):
        build_diffusion_module(tiny_cfg("adapter=lora", "adapter.rank=0"))
    with pytest.raises(ConfigError, match="adapter.*not found"):
        build_diffusion_module(tiny_cfg("adapter=lora", f"adapter.init_from={tmp_path / 'nope.safetensors'}"))


@pytest.mark.slow
def test_lora_run_stopped_and_resumed_equals_uninterrupted(tmp_path, base):
    lora = [base, "adapter=lora", "adapter.preset=attention_ff", "optim.lr=1e-2"]
    ref, run = stopped_and_resumed(tmp_path, *lora)


def test_lora_trains_from_the_latent_cache(tiny_cfg, base, tmp_path):
    """The latent cache's stored text contexts are bypassed when the text encoder has an adapter (they were made
    without it); the U-Net adapter still trains from the cached latents."""
    cfg = tiny_cfg(base, "adapter=lora", "adapter.text_encoder=true", "module.ema_decay=null",
                   f"++data.latent_cache={tmp_path / 'latents'}", *CKPT)
    L.seed_everything(cfg.seed)
    before = {k: v.clone() for k, v in build_diffusion_module(cfg).lora.state_dict().items()}
    result = train(cfg)
    assert any((tmp_path / "latents").rglob("*.safetensors"))  # trained from the cache
    after = torch.load(result["last_checkpoint"], weights_only=True)["state_dict"]
    for prefix in ("loras.unet_", "loras.te_"):
        keys = [k for k in before if k.startswith(prefix) and k.endswith("up.weight")]
        assert keys and any(not torch.equal(before[k], after["lora." + k]) for k in keys), prefix


def test_a_module_fitted_without_a_run_folder_writes_no_files(tiny_cfg, base, tmp_path, monkeypatch):
    """The run's own files (lora.safetensors) go into the run folder train(cfg) gives the module; a Trainer made
    without one (a notebook, a test) leaves the working folder alone."""
    import lightning as L

    from ldm.training.run.stages import build as build_node

    cfg = tiny_cfg(base, "adapter=lora", "trainer.max_steps=1")
    module, data = build_diffusion_module(cfg), build_node(cfg.data, "data")
    monkeypatch.chdir(tmp_path)
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu").fit(module, datamodule=data)
    assert module.global_step == 1 and module.written_files == {}
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_run_of_ours_with_other_sizes_names_the_keys_to_set(tiny_cfg, base):
    """model.pretrained = one of our runs whose VAE is not the configured one (a data=folder run's first stage
    trains a narrower VAE; a scaling factor changes no shape): stop naming the keys, before anything trains."""
    narrower = tiny_cfg(base, "adapter=lora", "+model.autoencoder.base_channels=64")
    with pytest.raises(ConfigError, match=r"\+\+model\.autoencoder\.base_channels=32"):
        build_diffusion_module(narrower)
    rescaled = tiny_cfg(base, "adapter=lora", "+model.autoencoder.scaling_factor=0.5")
    fix = r"set \+\+model\.autoencoder\.scaling_factor=0\.18215 \+\+model\.autoencoder\.weights=null \("
    with pytest.raises(ConfigError, match=fix):
        build_diffusion_module(rescaled)
    build_diffusion_module(tiny_cfg(base, "adapter=lora", "model.unet.gradient_checkpointing=true"))  # how it runs
