"""model=flux_tiny: a tiny Flux.1 (double- then single-stream blocks, rotary positions) trains with schedule=flow
through the same training module as the U-Net and the MMDiT, its checkpoint loads through the bounded builders and
samples with flow_euler; a guidance-embedding Flux (FLUX.1-dev's kind) gets the sampling guidance scale as its
guidance input, in one conditional pass; the FLUX.1 presets build diffusers' parameter counts."""

import pytest
import torch

from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.training import CKPT, compose_train

FLUX_TINY = ["model=flux_tiny", "schedule=flow", "sampler=flow_euler", "module.timesteps.kind=logit_normal",
             "data.batch_size=4", "data.train.resolution=16", "data.train.size=16", "data.val.size=4",
             "data.val.resolution=16", "trainer.max_steps=3", "trainer.val_check_interval=3",
             "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             "trainer.log_every_n_steps=1", "lr_scheduler.warmup_steps=1", "callbacks=none", "++data.latent_cache=null"]


def test_flux_tiny_trains_with_flow_matching_and_samples(tmp_path):
    from ldm.diffusion.flow import FlowMatching
    from ldm.formats.load import load_bundle
    from ldm.models.flux import Flux
    from ldm.pipelines import text_to_image

    result = train(compose_train(tmp_path, FLUX_TINY + CKPT + ["optim.lr=1e-3"]))
    assert result["global_step"] == 3 and result["metrics"]["train/loss"] > 0 and "val/loss" in result["metrics"]
    bundle = load_bundle(result["last_checkpoint"], device="cpu", dtype="float32")
    assert isinstance(bundle.unet, Flux) and bundle.schedule == FlowMatching()
    assert bundle.unet.double_blocks[0].x_block.adaLN_modulation[1].weight.abs().sum() > 0  # it trained
    calls = []
    bundle.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    images = text_to_image(bundle, ["a red circle"], sampler="flow_euler", steps=2, guidance_scale=3.0, height=16,
                           width=16, seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert calls == [2, 2]  # no guidance embedding: classifier-free guidance, both branches in one batch
    # adapter=lora on it: kohya's Flux layout, merged by sample.py lora= (flow_euler)
    from hydra import compose, initialize_config_dir

    from ldm.formats.lora_files import apply_lora_files, bundle_roots
    from ldm.pipelines.cli import register_configs, sample
    from tests.helpers import CONFIGS

    lora_run = tmp_path / "lora"
    lora = train(compose_train(lora_run, FLUX_TINY + ["adapter=lora", f"model.pretrained={result['last_checkpoint']}",
                                                      "optim.lr=1e-2"]))
    assert lora["global_step"] == 3
    lora_file = lora_run / "run" / "lora.safetensors"
    files = apply_lora_files(bundle_roots(bundle), [str(lora_file)], report=lambda m: None)
    assert len(files[0].weights) == 12 and not files[0].unmapped  # 2 x 2 x (qkv, proj) + 2 x (linear1, linear2)
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={result['last_checkpoint']}", f"out_dir={tmp_path / 'png'}",
                                           "prompt=a red circle", "n_images=1", "sampler=flow_euler",
                                           "sampler.steps=2", f"lora=[{lora_file}]"])
    assert [p.name for p in sample(cfg)] == ["00000.png", "grid.png"]


def test_a_guidance_embedding_flux_gets_the_scale_as_its_input(tmp_path):
    """FLUX.1-dev's kind (model.unet.guidance_embeds=true): trained with its train_guidance, sampled with the
    guidance scale as context['guidance'] and the conditional prediction alone, as diffusers' FluxPipeline."""
    from ldm.pipelines import text_to_image

    cfg = compose_train(tmp_path, FLUX_TINY + ["model.unet.guidance_embeds=true", "model.unet.train_guidance=2.0"])
    module = build_diffusion_module(cfg)
    seen = []
    module.unet.register_forward_pre_hook(lambda m, args: seen.append(args[2].get("guidance")))
    opt = torch.optim.SGD(module.unet.parameters(), lr=0.1)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a red circle", "a blue square"]}
    for _ in range(3):  # adaLN-Zero: the output layer moves first, then the modulations, then the embedders
        opt.zero_grad()
        module.step_loss(batch).backward()
        opt.step()
    assert seen[0] is None  # training: the model's own train_guidance
    grads = module.unet.guidance_in.mlp[0].weight.grad
    assert grads is not None and grads.abs().sum() > 0
    seen.clear()
    images = text_to_image(module.bundle(use_ema=False), ["a red circle", "a blue square"], sampler="flow_euler",
                           steps=2, guidance_scale=4.5, height=16, width=16, seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert len(seen) == 2 and all(torch.equal(g, torch.full((2,), 4.5)) for g in seen)  # batch 2: no CFG doubling


def test_mismatched_text_widths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="joint_attention_dim"):
        build_diffusion_module(compose_train(tmp_path, FLUX_TINY + ["model.unet.joint_attention_dim=128"]))
    with pytest.raises(ConfigError, match="pooled_projection_dim"):
        build_diffusion_module(compose_train(tmp_path, FLUX_TINY + ["model.unet.pooled_projection_dim=24"]))


@pytest.mark.parametrize("model", ["flux_dev", "flux_schnell"])
def test_flux_presets_need_their_weights_and_build_the_presets_denoiser(tmp_path, model):
    """model=flux_dev / flux_schnell: the placeholder fails first, naming the key (before the text encoders would be
    fetched from the hub); the config's Flux, built on the meta device, has the preset's parameter count
    (tests/models/test_flux.py checks those against diffusers' published configs)."""
    from hydra.utils import instantiate

    from ldm.models.flux import FLUX_PRESETS, parameter_count

    cfg = compose_train(tmp_path, [f"model={model}", "schedule=flow_flux", "sampler=flow_euler"])
    with pytest.raises(ConfigError, match="model.pretrained is not set"):
        build_diffusion_module(cfg)
    cfg = compose_train(tmp_path, [f"model={model}", "model.pretrained=x"])
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
    assert unet.gradient_checkpointing and unet.guidance_embeds == (model == "flux_dev")
    assert sum(p.numel() for p in unet.parameters()) == parameter_count(FLUX_PRESETS[model])
    assert cfg.model.text_encoder.t5_length == (512 if model == "flux_dev" else 256)
