"""model=mmdit_tiny: the SD3-shaped model (tiny MMDiT + two tiny projected CLIPs as SD3's L + G) trains with
schedule=flow through the same training module as the U-Net and samples with flow_euler; the SD3 presets stop with
a clear error when their weights are not given."""

import json

import pytest
import torch

from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.training import MMDIT_TINY, compose_train



def test_mmdit_tiny_trains_with_flow_matching_and_samples(tmp_path):
    from ldm.models.mmdit import MMDiT
    from ldm.pipelines import text_to_image

    from ldm.diffusion.flow import FlowMatching
    from ldm.formats.load import load_bundle
    from tests.helpers.training import CKPT

    result = train(compose_train(tmp_path, MMDIT_TINY + CKPT + ["optim.lr=1e-3"]))
    assert result["global_step"] == 3 and result["metrics"]["train/loss"] > 0 and "val/loss" in result["metrics"]
    # its checkpoint loads through the bounded builders (MMDiT, the tiny SD3 encoder, the flow schedule) and samples
    bundle = load_bundle(result["last_checkpoint"], device="cpu", dtype="float32")
    assert isinstance(bundle.unet, MMDiT) and bundle.schedule == FlowMatching()
    images = text_to_image(bundle, ["a red circle"], sampler="flow_euler", steps=2, guidance_scale=3.0, height=16,
                           width=16, seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    # adapter=lora on it: a kohya-layout file of the MMDiT's attention layers that merges back into the base
    from ldm.formats.lora_files import apply_lora_files, bundle_roots

    lora_run = tmp_path / "lora"
    lora = train(compose_train(lora_run, MMDIT_TINY + ["adapter=lora", f"model.pretrained={result['last_checkpoint']}",
                                                       "optim.lr=1e-2"]))
    assert lora["global_step"] == 3
    files = apply_lora_files(bundle_roots(bundle), [str(lora_run / "run" / "lora.safetensors")], report=lambda m: None)
    # block 0: x qkv, proj, attn2.qkv, attn2.proj + context qkv, proj; block 1: 2 + 2; block 2: 2 + context qkv
    assert len(files[0].weights) == 13 and not files[0].unmapped
    # and in diffusers' layout (StableDiffusion3Pipeline.load_lora_weights reads no kohya names): the same adapter
    from ldm.formats.lora_files import read_lora_file

    peft_file = read_lora_file(lora_run / "run" / "lora_diffusers", bundle_roots(bundle))
    assert peft_file.layout == "peft" and set(peft_file.weights) == set(files[0].weights)
    assert all(torch.allclose(peft_file.weights[k]["up"], w["up"]) for k, w in files[0].weights.items())
    # sample.py: the checkpoint with the LoRA, flow_euler; the default ddim is refused naming the sampler to use
    from hydra import compose, initialize_config_dir

    from ldm.pipelines.cli import SampleConfigError, register_configs, sample
    from tests.helpers import CONFIGS

    register_configs()

    def sample_cfg(*overrides):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            return compose("sample", overrides=[f"ckpt={result['last_checkpoint']}", f"out_dir={tmp_path / 'png'}",
                                                "prompt=a red circle", "n_images=1", *overrides])

    written = sample(sample_cfg("sampler=flow_euler", "sampler.steps=2",
                                f"lora=[{lora_run / 'run' / 'lora.safetensors'}]"))
    assert [p.name for p in written] == ["00000.png", "grid.png"]
    written = sample(sample_cfg("sampler=flow_euler", "sampler.steps=2", "overwrite=true", "t5=false",
                                f"lora=[{lora_run / 'run' / 'lora_diffusers'}:0.5]"))
    assert [p.name for p in written] == ["00000.png", "grid.png"]
    from PIL import Image

    assert json.loads(Image.open(written[0]).text["ldm_parameters"])["t5"] is False  # recorded with the image
    with pytest.raises(SampleConfigError, match="flow_euler"):
        sample(sample_cfg("sampler.steps=2", "overwrite=true"))
    module = build_diffusion_module(compose_train(tmp_path, MMDIT_TINY))
    assert isinstance(module.unet, MMDiT)
    # two optimisation steps through the module's own loss: adaLN-Zero starts with only the output layer receiving
    # a gradient; after it moved, the blocks' modulations do
    opt = torch.optim.SGD(module.unet.parameters(), lr=0.1)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a red circle", "a blue square"]}
    for _ in range(2):
        opt.zero_grad()
        module.step_loss(batch).backward()
        opt.step()
    assert module.unet.final_layer.linear.weight.abs().sum() > 0
    assert module.unet.joint_blocks[0].x_block.adaLN_modulation[1].weight.abs().sum() > 0
    images = text_to_image(module.bundle(use_ema=False), ["a red circle", "a blue square"], sampler="flow_euler",
                           steps=3, guidance_scale=4.0, height=16, width=16, seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_mismatched_text_widths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="joint_attention_dim"):
        build_diffusion_module(compose_train(tmp_path, MMDIT_TINY + ["model.text_encoder.joint_dim=128"]))
    with pytest.raises(ConfigError, match="pooled_projection_dim"):
        build_diffusion_module(compose_train(tmp_path, MMDIT_TINY + ["model.unet.pooled_projection_dim=24"]))


@pytest.mark.parametrize("model", ["sd35_medium", "sd3_medium", "sd35_large"])
def test_sd3_finetune_needs_its_weights(tmp_path, model):
    """The placeholder fails first, naming the key (before the text encoders would be fetched from the hub)."""
    cfg = compose_train(tmp_path, [f"model={model}", "experiment=sd3_finetune", f"data.train.root={tmp_path}"])
    with pytest.raises(ConfigError, match="model.pretrained is not set"):
        build_diffusion_module(cfg)


@pytest.mark.parametrize("model", ["sd3_medium", "sd35_medium", "sd35_large"])
def test_sd3_model_configs_build_the_presets_denoiser(tmp_path, model):
    """The model config's MMDiT, built on the meta device: the preset's parameter count (tests/models/test_mmdit.py
    checks those against diffusers' published configs)."""
    from hydra.utils import instantiate

    from ldm.models.mmdit import MMDIT_PRESETS, parameter_count

    cfg = compose_train(tmp_path, [f"model={model}", "model.pretrained=x"])
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
    assert unet.gradient_checkpointing
    assert sum(p.numel() for p in unet.parameters()) == parameter_count(MMDIT_PRESETS[model])
