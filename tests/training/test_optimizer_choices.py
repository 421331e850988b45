"""optim=prodigy / adamw_schedulefree / lion / came: each builds from its config, lowers a loss, restores its state
exactly from a checkpoint, and a run killed with SIGKILL resumes to the same losses step for step (-m slow).
Schedule-free AdamW's two sets of weights: validation, sampling, the EMA, checkpoints and the run's files see the
average x (checked against the paper's y = (1 - beta1) z + beta1 x), training continues on bit for bit the same y."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ldm.training.module.diffusion_module import LatentDiffusion
from ldm.training.module.optimizer_mode import TRAIN_WEIGHTS
from ldm.training.module.trained.denoiser import WholeDenoiser
from ldm.training.run.config_checks import ConfigError, check_values
from ldm.training.run.train import build_diffusion_module, train
from tests.helpers.training import CKPT, base, logged_losses, tiny_cfg  # noqa: F401 (fixtures)
from tests.helpers.kill_resume import kill_resume_compare

# optim option -> (its library's module, the pip package named in the error, an lr for 150 steps on the toy problem)
OPTIMS = {"prodigy": ("prodigyopt", "prodigyopt", None), "adamw_schedulefree": ("schedulefree", "schedulefree", 3e-2),
          "lion": ("lion_pytorch", "lion-pytorch", 1e-2), "came": ("came_pytorch", "came-pytorch", 1e-2)}


def _toy():
    """Least squares: 4 outputs of 16 inputs, 64 rows (minimum 0)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 16, generator=g), torch.randn(4, 16, generator=g)
    return x, x @ w.T


def _loss(layer, data):
    x, y = data
    return (layer(x) - y).pow(2).mean()


def _optimizer(tiny_cfg, option, params, lr=None):
    cfg = tiny_cfg(f"optim={option}", *([f"optim.lr={lr}"] if lr else []))
    opt = instantiate(cfg.optim)(params)
    if hasattr(opt, "train"):  # schedule-free: training steps in train mode (the module does this in on_train_start)
        opt.train()
    return opt


def _steps(layer, opt, data, n):
    for _ in range(n):
        _loss(layer, data).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("option", OPTIMS)
def test_optimizer_from_its_config_lowers_the_loss(tiny_cfg, option):
    torch.manual_seed(0)
    layer, data = torch.nn.Linear(16, 4), _toy()
    opt = _optimizer(tiny_cfg, option, layer.parameters(), OPTIMS[option][2])
    assert type(opt).__module__.startswith(OPTIMS[option][0])
    before = _loss(layer, data).item()
    _steps(layer, opt, data, 150)
    if hasattr(opt, "eval"):
        opt.eval()  # the weights to evaluate: schedule-free's average x
    assert _loss(layer, data).item() < 0.2 * before


@pytest.mark.parametrize("option", OPTIMS)
def test_optimizer_state_round_trips_a_checkpoint_exactly(tiny_cfg, option):
    """The state through torch.save / torch.load(weights_only=True) as in a checkpoint: the next steps are the
    same, bit for bit, as those of the optimizer that was never saved."""
    torch.manual_seed(0)
    layer, data = torch.nn.Linear(16, 4), _toy()
    opt = _optimizer(tiny_cfg, option, layer.parameters())
    _steps(layer, opt, data, 3)
    buf = io.BytesIO()
    torch.save({"weights": layer.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    again = torch.nn.Linear(16, 4)
    again.load_state_dict(saved["weights"])
    opt2 = _optimizer(tiny_cfg, option, again.parameters())
    opt2.load_state_dict(saved["optimizer"])
    _steps(layer, opt, data, 2)
    _steps(again, opt2, data, 2)
    moved = (layer.weight - saved["weights"]["weight"]).abs().max()
    assert moved > 0  # the two steps changed the weights
    for a, b in zip(layer.parameters(), again.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("option", OPTIMS)
def test_a_missing_library_is_named_with_its_pip_command(tiny_cfg, option, monkeypatch):
    module, package, _ = OPTIMS[option]
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"optim={option} needs {package}: pip install -e '\.\[optim\]'"):
        instantiate(tiny_cfg(f"optim={option}").optim)(torch.nn.Linear(2, 2).parameters())


def test_schedule_free_refuses_a_decaying_schedule(tiny_cfg):
    with pytest.raises(ConfigError, match="lr_scheduler.schedule=constant"):
        check_values(tiny_cfg("optim=adamw_schedulefree", "lr_scheduler.schedule=cosine",
                              "+lr_scheduler.total_steps=10"))
    check_values(tiny_cfg("optim=adamw_schedulefree", "lr_scheduler.warmup_steps=5"))  # a warm-up, then constant
    check_values(tiny_cfg("optim=adamw", "lr_scheduler.schedule=cosine", "+lr_scheduler.total_steps=10"))


# ------------------------------------------------------------------------------------ schedule-free's x and y

def _x_from(y, z, beta1):
    """The average x of schedule-free AdamW (Defazio et al. 2024, Alg. 1): y = (1 - beta1) z + beta1 x."""
    return (y - (1 - beta1) * z) / beta1


def _schedule_free_module(tiny_cfg, *overrides):
    module = build_diffusion_module(tiny_cfg("optim=adamw_schedulefree", "optim.lr=1e-2", *overrides))
    opt = module.configure_optimizers()["optimizer"]
    module.optimizer_mode.start_training()
    return module, opt


def _random_steps(module, opt, n, seed, sample_between=False):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in module.unet.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        if sample_between:
            with module.sampling_bundle(use_ema=False):
                pass


def test_schedule_free_sampling_sees_x_and_training_continues_on_the_same_y(tiny_cfg):
    module, opt = _schedule_free_module(tiny_cfg, "module.ema_decay=null")
    _random_steps(module, opt, 3, seed=1)
    y = {k: v.detach().clone() for k, v in module.unet.named_parameters()}
    beta1 = opt.param_groups[0]["betas"][0]
    with module.sampling_bundle(use_ema=False) as bundle:
        seen = {k: v.detach().clone() for k, v in bundle.unet.named_parameters()}
        for name, p in module.unet.named_parameters():
            x = _x_from(y[name], opt.state[p]["z"], beta1)
            torch.testing.assert_close(seen[name], x, atol=1e-6, rtol=1e-5, msg=name)
        assert max((seen[k] - y[k]).abs().max() for k in y) > 1e-3  # x is not y
    for name, p in module.unet.named_parameters():
        assert torch.equal(p, y[name]), name  # exactly y again, not x -> y in floating point
    copied = dict(module.bundle(use_ema=False).unet.named_parameters())  # a copy that keeps x
    for name, p in module.unet.named_parameters():
        torch.testing.assert_close(copied[name], seen[name], atol=0, rtol=0, msg=name)
        assert torch.equal(p, y[name]), name

    # the same steps with a sampling pass after each: the same weights, bit for bit
    a, opt_a = _schedule_free_module(tiny_cfg, "module.ema_decay=null")
    b, opt_b = _schedule_free_module(tiny_cfg, "module.ema_decay=null")
    b.unet.load_state_dict(a.unet.state_dict())
    _random_steps(a, opt_a, 4, seed=2)
    _random_steps(b, opt_b, 4, seed=2, sample_between=True)
    for (name, p), q in zip(a.unet.named_parameters(), b.unet.parameters()):
        assert torch.equal(p, q), name


def _checkpoints(run_dir):
    return {int(torch.load(p, weights_only=True)["global_step"]): torch.load(p, weights_only=True)
            for p in (run_dir / "checkpoints").glob("epoch=*.ckpt")}


def test_schedule_free_run_validates_saves_and_averages_x(tiny_cfg, tmp_path, monkeypatch):
    """A fit with validation every 2 steps trains the same steps as one without validation; its checkpoints hold x
    in the state dict and y beside it; the EMA averages x; the run's files are written from x."""
    written, validated_on = [], {}

    def record_files(self, end):
        written.append({k: v.detach().clone() for k, v in self.networks.unet.state_dict().items()})
        return {}

    def record_validation(self, batch, batch_idx):
        validated_on[self.global_step] = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        return validation_loss(self, batch, batch_idx)

    validation_loss = LatentDiffusion.validation_loss
    monkeypatch.setattr(WholeDenoiser, "write_files", record_files)
    monkeypatch.setattr(LatentDiffusion, "validation_loss", record_validation)
    common = ["optim=adamw_schedulefree", "optim.lr=1e-2", "trainer.max_steps=4", "module.ema_decay=0.9",
              "lr_scheduler.warmup_steps=0", *CKPT, "+callbacks.checkpoint.every_n_train_steps=1",
              "+callbacks.checkpoint.save_top_k=-1"]
    validated = train(tiny_cfg(*common, "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                               f"paths.run_dir={tmp_path / 'validated'}"))
    plain = train(tiny_cfg(*common, "trainer.limit_val_batches=0", f"paths.run_dir={tmp_path / 'plain'}"))
    assert "val/loss" in validated["metrics"]
    losses = logged_losses(tmp_path / "validated")
    assert [s for s, _ in losses] == [0, 1, 2, 3] and losses == logged_losses(tmp_path / "plain")

    ckpts, plain_ckpts = _checkpoints(tmp_path / "validated"), _checkpoints(tmp_path / "plain")
    assert sorted(ckpts) == [1, 2, 3, 4]
    for step, ckpt in ckpts.items():
        y, state = ckpt["ldm"][TRAIN_WEIGHTS], ckpt["state_dict"]
        for k in y:  # the same training weights (and so inference weights) with or without validation
            assert torch.equal(y[k], plain_ckpts[step]["ldm"][TRAIN_WEIGHTS][k]), k
            assert torch.equal(state[k], plain_ckpts[step]["state_dict"][k]), k
        opt = ckpt["optimizer_states"][0]
        beta1 = opt["param_groups"][0]["betas"][0]
        indices = [i for group in opt["param_groups"] for i in group["params"]]
        assert list(y) == [k for k in state if k.startswith("unet.")]  # every U-Net weight, in optimizer order
        for k, i in zip(y, indices):
            torch.testing.assert_close(state[k], _x_from(y[k], opt["state"][i]["z"], beta1), atol=1e-6, rtol=1e-5,
                                       msg=k)
        if step > 1:  # after the first step x = y = z (its averaging weight is 1)
            assert max((state[k] - y[k]).abs().max() for k in y) > 1e-4  # x, not y
    # EMA of x (ldm.training.module.ema: decay min(0.9, (1 + n) / (10 + n)) after n updates)
    for step in (2, 3, 4):
        before, after = ckpts[step - 1]["state_dict"], ckpts[step]["state_dict"]
        n = int(before["ema.num_updates"])
        weight = 1 - min(0.9, (1 + n) / (10 + n))
        for k in (k for k in before if k.startswith("unet.")):
            e = "ema.model." + k[len("unet."):]
            torch.testing.assert_close(after[e], before[e] + weight * (after[k] - before[e]), atol=1e-6, rtol=1e-5,
                                       msg=e)
    # validation: on x
    assert sorted(validated_on) == [2, 4]
    for step in (2, 4):
        for k, v in validated_on[step].items():
            assert torch.equal(v, ckpts[step]["state_dict"]["unet." + k]), k
    # the run's files: from x (the last checkpoint's state dict), not y
    last = torch.load(validated["last_checkpoint"], weights_only=True)["state_dict"]
    assert len(written) == 2
    for k, v in written[0].items():
        assert torch.equal(v, last["unet." + k]), k


def test_schedule_free_lora_file_holds_x(tiny_cfg, base):  # noqa: F811 (fixture)
    """adapter=lora: the checkpoint keeps x and y of the adapter's weights, lora.safetensors holds x."""
    from ldm.formats.lora_files import read_lora_file

    cfg = tiny_cfg(base, "adapter=lora", "optim=adamw_schedulefree", "optim.lr=1e-2", "module.ema_decay=null",
                   "lr_scheduler.warmup_steps=0", *CKPT)
    result = train(cfg)
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    x, y = ckpt["state_dict"], ckpt["ldm"][TRAIN_WEIGHTS]
    assert y and set(y) == {k for k in x if k.startswith("lora.") and k.endswith(".weight")}  # not the alphas
    assert max((x[k] - y[k]).abs().max() for k in y) > 1e-4
    module = build_diffusion_module(cfg)
    lora = read_lora_file(Path(result["run_dir"]) / "lora.safetensors", module.adapter_roots())
    net = lora.network(module.adapter_roots())
    for key, m in net.loras.items():
        torch.testing.assert_close(m.up.weight, x[f"lora.loras.{key}.up.weight"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m.down.weight, x[f"lora.loras.{key}.down.weight"], atol=1e-6, rtol=1e-6)


def test_schedule_free_stopped_and_resumed_equals_uninterrupted(tiny_cfg, tmp_path):
    """In-process stop at step 3 (a checkpoint written after a validation) and ckpt_path=last: y comes back from
    the checkpoint exactly, so steps 4-6 log the same losses and end with the same weights."""
    common = ["optim=adamw_schedulefree", "optim.lr=1e-2", "module.ema_decay=0.9", "trainer.val_check_interval=3",
              "trainer.limit_val_batches=1", *CKPT, "+callbacks.checkpoint.every_n_train_steps=1"]
    ref = train(tiny_cfg(*common, "trainer.max_steps=6", f"paths.run_dir={tmp_path / 'ref'}"))
    run = [*common, f"paths.run_dir={tmp_path / 'run'}"]
    train(tiny_cfg(*run, "trainer.max_steps=3"))
    resumed = train(tiny_cfg(*run, "trainer.max_steps=6", "ckpt_path=last"))
    ref_losses = dict(logged_losses(tmp_path / "ref"))
    assert sorted(ref_losses) == list(range(6))
    for step, loss in logged_losses(tmp_path / "run"):
        assert loss == ref_losses[step], step
    a = torch.load(ref["last_checkpoint"], weights_only=True)
    b = torch.load(resumed["last_checkpoint"], weights_only=True)
    for k, v in a["ldm"][TRAIN_WEIGHTS].items():
        assert torch.equal(v, b["ldm"][TRAIN_WEIGHTS][k]), k
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


# ------------------------------------------------------------------------------------ kill -9, train.py

@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIMS)
def test_kill9_resume_with_each_optimizer(tmp_path, option):
    """train.py killed with SIGKILL after step 10 (mid-epoch, epoch 1) and resumed with ckpt_path=last: the same
    loss at every step and the same final weights as an uninterrupted run."""
    kill_resume_compare(tmp_path, f"optim={option}", "data.train.size=24", "data.train.resolution=16",
                        "data.val.resolution=16")
