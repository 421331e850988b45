"""schedule=flow: the same training module trains a U-Net on flow matching's velocity (no new branch), its
checkpoint loads with the flow schedule, and text_to_image samples it with flow_euler exactly as diffusers'
FlowMatchEulerDiscreteScheduler loop over the same U-Net does."""

import pytest
import torch

from ldm.diffusion.flow import FlowMatching
from ldm.training.run.train import ConfigError, build_diffusion_module, train

FLOW = ["schedule=flow", "sampler=flow_euler"]


def test_a_unet_trains_with_flow_matching_and_samples_as_diffusers_steps(tiny_cfg, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ldm.formats.load import load_bundle
    from ldm.pipelines import text_to_image

    result = train(tiny_cfg(*FLOW, "schedule.shift=3.0", "data.val.resolution=16", "module.timesteps.kind=logit_normal",
                            "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                            "+callbacks.checkpoint.save_last=true",
                            "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"))
    assert result["global_step"] == 3 and result["metrics"]["train/loss"] > 0 and "val/loss" in result["metrics"]
    bundle = load_bundle(result["last_checkpoint"], device="cpu", dtype="float32")
    assert bundle.schedule == FlowMatching(shift=3.0)

    seen = []
    images = text_to_image(bundle, ["a red circle", "a blue square"], sampler="flow_euler", steps=4,
                           guidance_scale=3.0, height=16, width=16, seed=0,
                           callback=lambda i, t, x, x0: seen.append(x.clone()))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()

    # the reference: diffusers' SD3 loop (batched [uncond; cond], CFG, scheduler.step) over the same U-Net
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(4)
    f = bundle.downsample_factor
    latents = torch.randn((2, bundle.latent_channels, 16 // f, 16 // f), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx = torch.cat([bundle.text_encoder.empty_context(1).expand(2, -1, -1),
                         bundle.text_encoder(["a red circle", "a blue square"])])
        for t in ref.timesteps:
            out_u, out_c = bundle.unet(torch.cat([latents, latents]), t.expand(4), ctx).chunk(2)
            latents = ref.step(out_u + 3.0 * (out_c - out_u), t, latents, return_dict=False)[0]
    torch.testing.assert_close(seen[-1], latents, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="flow_euler"):
        text_to_image(bundle, ["a red circle"], sampler="ddim", steps=2, height=16, width=16, seed=0)

    # the ldm bundle keeps the flow schedule; the SD layouts, which cannot, say so
    from ldm.formats.common import ExportError
    from ldm.formats.exporter import export

    export(result["last_checkpoint"], "ldm", tmp_path / "bundle")
    assert load_bundle(tmp_path / "bundle", device="cpu", dtype="float32").schedule == FlowMatching(shift=3.0)
    with pytest.raises(ExportError, match="schedule=flow"):
        export(result["last_checkpoint"], "diffusers", tmp_path / "diffusers")


def test_flow_loss_is_the_velocity_mse_through_the_module(tiny_cfg):
    module = build_diffusion_module(tiny_cfg(*FLOW, "module.min_snr_gamma=null"))
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 900])
    noise = torch.randn_like(latents)
    x_t = module.objective.noisy(latents, t, noise)
    sigma = ((t + 1) / 1000).reshape(-1, 1, 1, 1)  # shift 1.0: sigma_t = (t + 1) / T
    torch.testing.assert_close(x_t, (1 - sigma) * latents + sigma * noise)
    out = torch.randn_like(latents)
    loss = module.batch_loss(out, module.objective.target(latents, noise, t), t, {"caption": ["a", "b"]})
    torch.testing.assert_close(loss, ((out - (noise - latents)) ** 2).mean())


@pytest.mark.parametrize("overrides,match", [(["schedule=flow"], "sampler=flow_euler"),
                                             (["sampler=flow_euler"], "other than flow_euler"),
                                             (FLOW + ["module.loss.debiased_estimation=true"],
                                              "debiased_estimation")])
def test_flow_settings_that_do_not_fit_are_config_errors(tiny_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        train(tiny_cfg(*overrides))
