"""kohya LoRA files for SDXL: lora_unet_* (diffusers names) + lora_te1_* (ViT-L) / lora_te2_* (bigG), as
sd-scripts' sdxl_train_network.py writes them; diffusers' StableDiffusionXLPipeline.load_lora_weights reads our file
and computes our adapted outputs; the file reads back exactly."""

import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.formats.diffusers_folder import write_diffusers
from ldm.formats.lora_files import read_lora_file, save_lora_file
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.lora import LoRAConfig, LoRANetwork
from ldm.models.sdxl_conditioning import default_size_values, unet_conditioning
from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_sdxl_clips
from ldm.models.unet import UNet
from tests.helpers.models import TINY_XL, randomize

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kohya_sdxl_lora_loads_in_diffusers_with_our_outputs(tmp_path):
    clips = write_tiny_sdxl_clips(tmp_path / "clips")
    bundle = ModelBundle(randomize(UNet(**TINY_XL), 1), randomize(AutoencoderKL.from_preset("tiny"), 2),
                         DualCLIPTextEncoder.from_pretrained(clips), NoiseSchedule.make("scaled_linear")).eval()
    write_diffusers(bundle, tmp_path / "pipe", resolution=16)
    roots = {"unet": bundle.unet, "text_encoder": bundle.text_encoder}
    torch.manual_seed(3)
    net = LoRANetwork.build(roots, LoRAConfig(preset="attention", rank=4, alpha=2.0, text_encoder=True))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in net.loras.values():
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=g) * 0.2)
    net.eval()
    path = save_lora_file(net, roots, tmp_path / "lora.safetensors", "kohya")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    # sd-scripts' names for an SDXL base (library/sdxl_model_util.py, library/sai_model_spec.py)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in keys
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in keys)
    assert not any(k.startswith("lora_te_") for k in keys)
    back = read_lora_file(path, roots)
    assert back.layout == "kohya" and back.unmapped == [] and set(back.weights) == set(net.weights())

    prompts = ["a red circle"]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sizes = default_size_values(1, 16, 16)
    net.attach(roots)
    try:
        with torch.no_grad():
            text = bundle.text_encoder(prompts)
            ours = bundle.unet(x, 300, unet_conditioning(text, sizes))
    finally:
        net.detach()
    with torch.no_grad():
        plain = bundle.text_encoder(prompts)
    assert (plain["pooled"] - text["pooled"]).abs().max() > 1e-3  # the bigG adapter does something

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True,
                                                               add_watermarker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        theirs = pipe.unet(x, 300, encoder_hidden_states=pe,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
    torch.testing.assert_close(pe, text["crossattn"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, text["pooled"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
