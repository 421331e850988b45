"""Memory and speed switches: optim=adamw8bit / adafactor, trainer.precision=bf16-mixed / 16-mixed on the CPU,
module.compile, and the loss / timestep / noise options wired through train() (config errors name the key)."""

import io
import shutil
import sys

import pytest
import torch
from hydra.utils import instantiate

from ldm.training.run.config_checks import ConfigError, check_values
from ldm.training.build.optimizers import adamw8bit
from ldm.training.build.precision import ClippableMixedPrecision, precision_overrides
from ldm.training.run.train import train


def _steps(make_optimizer, n=5):
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 128)  # 16,384 weights: above bitsandbytes' min_8bit_size
    target = torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
    opt = make_optimizer(layer.parameters())
    start = layer.weight.detach().clone()
    for _ in range(n):
        loss = (layer.weight - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return layer, opt, start


def test_adamw8bit_has_8bit_state_and_follows_adamw():
    pytest.importorskip("bitsandbytes")
    ref, _, start = _steps(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01))
    q, opt, _ = _steps(lambda p: adamw8bit(p, lr=1e-2, weight_decay=0.01))
    state = opt.state[q.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert state["state1"].shape == q.weight.shape
    moved = (ref.weight - start).abs().mean()
    assert moved > 0.03  # 5 Adam steps of ~lr each
    # block-wise 8-bit moments: the same updates up to quantisation error
    assert (q.weight - ref.weight).abs().mean() < 0.05 * moved
    # resumable: the state goes through torch.save / torch.load(weights_only=True) as in a checkpoint
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = adamw8bit(q.parameters(), lr=1e-2)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again.state[q.weight]["state2"], state["state2"])


def test_adamw8bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="optim=adamw8bit needs bitsandbytes"):
        adamw8bit(torch.nn.Linear(2, 2).parameters())


def test_adafactor_config_builds_torch_adafactor_with_factored_state(tiny_cfg):
    cfg = tiny_cfg("optim=adafactor")
    layer, opt, _ = _steps(instantiate(cfg.optim), n=2)
    assert isinstance(opt, torch.optim.Adafactor)
    assert opt.state[layer.weight]["row_var"].shape == (128, 1)  # rows + columns, not 2x the weights
    assert opt.state[layer.weight]["col_var"].shape == (1, 128)


def test_fp16_mixed_on_cpu_gets_a_grad_scaler(tiny_cfg):
    plugins = precision_overrides(tiny_cfg("trainer.precision=16-mixed", "optim.fused=false"))
    assert plugins["precision"] is None
    (plugin,) = plugins["plugins"]
    assert plugin.precision == "16-mixed" and isinstance(plugin.scaler, torch.amp.GradScaler)
    assert plugin.scaler._device == "cpu"


def test_bf16_mixed_clips_the_gradients_of_a_fused_optimizer(tiny_cfg):
    """trainer=gpu's defaults (bf16-mixed, fused AdamW, gradient_clip_val 1.0): Lightning's own plugin refused the
    combination at the first step ("does not allow for gradient clipping"), though bf16 scales nothing."""
    plugins = precision_overrides(tiny_cfg("trainer.precision=bf16-mixed"))
    (plugin,) = plugins["plugins"]
    assert plugins["precision"] is None and isinstance(plugin, ClippableMixedPrecision)
    assert plugin.precision == "bf16-mixed" and plugin.scaler is None and plugin.device == "cpu"
    (gpu,) = precision_overrides(tiny_cfg("trainer.precision=bf16-mixed", "trainer.accelerator=gpu"))["plugins"]
    assert gpu.device == "cuda" and gpu.scaler is None
    assert precision_overrides(tiny_cfg("trainer=fsdp")) == {}, "FSDPStrategy brings its FSDPPrecision"
    assert precision_overrides(tiny_cfg()) == {}
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(layer.parameters(), fused=True)
    assert opt._step_supports_amp_scaling  # what Lightning's MixedPrecision refused
    layer(torch.randn(8, 4) * 100).pow(2).sum().backward()
    assert torch.cat([p.grad.flatten() for p in layer.parameters()]).norm() > 10
    plugin.clip_gradients(opt, 1.0)
    assert torch.cat([p.grad.flatten() for p in layer.parameters()]).norm() == pytest.approx(1.0, rel=1e-4)
    cfg = tiny_cfg("trainer=gpu", "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0 and cfg.optim.fused
    _finite_run(train(cfg))  # trainer=gpu's composition, on a CPU stand-in


@pytest.mark.parametrize("override,match", [
    ("module.loss.type=l3", "module.loss.type"),
    ("module.loss.huber_schedule=cos", "module.loss.huber_schedule"),
    ("+module.loss.huber_scale=2", "unknown key"),
    ("module.timesteps.kind=beta", "module.timesteps.kind"),
    ("module.timesteps.max_timestep=1001", "module.timesteps.max_timestep"),
    ("module.noise.pyramid_iterations=-2", "module.noise.pyramid_iterations"),
    ("module.compile_backend=nope", "module.compile_backend"),
])
def test_bad_options_are_refused_before_training(tiny_cfg, override, match):
    extra = ["module.compile=true"] if "compile" in override else []
    with pytest.raises(ConfigError, match=match):
        check_values(tiny_cfg(override, *extra))


def test_cross_checks(tiny_cfg):
    with pytest.raises(ConfigError, match="optim.fused=false"):
        check_values(tiny_cfg("trainer.precision=16-mixed"))
    with pytest.raises(ConfigError, match="module.offset_noise"):
        check_values(tiny_cfg("module.offset_noise=0.1", "module.noise.pyramid_iterations=4"))
    with pytest.raises(ConfigError, match="schedule.prediction_type"):
        check_values(tiny_cfg("module.loss.debiased_estimation=true", "schedule.prediction_type=sample"))
    check_values(tiny_cfg())  # the defaults pass


def _finite_run(result):
    assert result["global_step"] == 2
    loss = result["metrics"]["train/loss"]
    assert torch.isfinite(torch.tensor(loss)) and loss > 0


def test_options_adamw8bit_bf16_train(tiny_cfg):
    """One tiny run with every non-default loss option, the 8-bit optimizer and bf16 autocast."""
    pytest.importorskip("bitsandbytes")
    _finite_run(train(tiny_cfg("optim=adamw8bit", "trainer.precision=bf16-mixed", "trainer.max_steps=2",
                               "trainer.val_check_interval=2", "module.loss.type=huber",
                               "module.loss.huber_schedule=exponential", "module.loss.debiased_estimation=true",
                               "module.timesteps.kind=logit_normal", "module.timesteps.max_timestep=900",
                               "module.noise.pyramid_iterations=3", "module.noise.ip_noise_gamma=0.1")))


def test_fp16_loss_scaling_adafactor_train(tiny_cfg):
    """fp16 autocast with GradScaler("cpu"), Adafactor, smooth-L1 and mode sampling."""
    _finite_run(train(tiny_cfg("optim=adafactor", "trainer.precision=16-mixed", "trainer.max_steps=2",
                               "trainer.val_check_interval=2", "module.loss.type=smooth_l1",
                               "module.timesteps.kind=mode")))


# torch.compile of even the tiny U-Net takes minutes on 2 busy cores (measured: aot_eager 43 s, inductor 237 s
# for the first forward), so these are slow tests.

@pytest.mark.slow
def test_compiled_unet_matches_eager_and_keeps_state_dict_keys(capsys):
    from ldm.models.unet import UNet
    from ldm.training.module.unet_compile import UNetCompile

    kwargs = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 1), attention_levels=(1,),
                  num_head_channels=32, context_dim=32, num_res_blocks=1)
    unet, eager = UNet(**kwargs), UNet(**kwargs)
    eager.load_state_dict(unet.state_dict())
    compiled = UNetCompile(unet, "aot_eager")
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 7, 32)
    torch.testing.assert_close(compiled(x, t, ctx), eager(x, t, ctx))
    assert compiled.compile_s > 0 and "first forward" in capsys.readouterr().out
    assert list(unet.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix in checkpoints
    import copy

    assert copy.deepcopy(unet)._compiled_call_impl is None  # copies (the EMA) run eager


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_unet_trains(tiny_cfg, capsys, backend):
    if backend == "inductor" and shutil.which("g++") is None:
        pytest.skip("inductor on the CPU needs g++")
    _finite_run(train(tiny_cfg("module.compile=true", f"module.compile_backend={backend}", "trainer.max_steps=2",
                               "trainer.val_check_interval=2")))
    assert f"torch.compile(U-Net, backend={backend}): first forward" in capsys.readouterr().out


def test_fp16_overflow_is_left_to_the_scaler_not_the_divergence_guard():
    from types import SimpleNamespace

    from ldm.training.module.guarded_update import loss_scale_overflow as overflow

    scaler = torch.amp.GradScaler("cpu")
    fake = SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)), global_step=3)
    assert overflow(fake, 0.5, float("inf"))  # finite loss, inf gradients: the scaler's overflow
    assert not overflow(fake, float("nan"), float("inf"))  # a NaN loss is a divergence: the guard counts it
    assert not overflow(fake, 0.5, 1.0)
    fake.__dict__["_trainer"] = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))  # bf16 / fp32
    assert not overflow(fake, 0.5, float("inf"))
