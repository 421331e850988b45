"""adapter=loha / lokr / dora: only the adapter trains and is checkpointed (with its EMA), the run writes a kohya /
LyCORIS file holding the EMA adapter, sample.py lora=FILE applies it to the base exactly as the run's checkpoint
does, training can start from such a file, and a stopped run resumes exactly (the slow test)."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.formats.lora_files import read_lora_file, save_lora_file
from ldm.formats.load import load_bundle
from ldm.pipelines.cli import sample
from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.sample import ckpt_config
from tests.helpers.training import CKPT, stopped_and_resumed
from tests.helpers.training import base  # noqa: F401 - the trained tiny base fixture

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ("loha", "lokr", "dora")


@pytest.mark.parametrize("kind", KINDS)
def test_trains_checkpoints_writes_and_samples(tiny_cfg, base, tmp_path, kind):  # noqa: F811
    cfg = tiny_cfg(base, f"adapter={kind}", "adapter.preset=full", "adapter.rank=2", "adapter.conv_rank=2",
                   "optim.lr=1e-2", "module.ema_decay=0.5", *CKPT)
    L.seed_everything(cfg.seed)
    module = build_diffusion_module(cfg)
    opt = module.configure_optimizers()["optimizer"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.lora.parameters()}
    assert not any(p.requires_grad for p in module.unet.parameters())
    assert {m.algo for m in module.lora.loras.values()} == {kind}
    before = {k: v.clone() for k, v in module.lora.state_dict().items()}

    result = train(cfg)
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    state = ckpt["state_dict"]
    assert state and all(k.startswith(("lora.", "ema.")) for k in state)
    assert ckpt["ldm"]["adapter"]["type"] == kind
    trained = [k for k in before if not torch.equal(before[k], state["lora." + k])]
    assert trained and any(k.endswith("magnitude") for k in trained) == (kind == "dora")

    # the run's file: the EMA adapter, in LyCORIS's kohya layout
    file = Path(result["run_dir"]) / "lora.safetensors"
    roots = module.adapter_roots()
    lora = read_lora_file(file, roots)
    assert lora.unmapped == [] and lora.kinds == [kind] and len(lora.weights) == len(module.lora.loras)
    net = lora.network(roots)
    ema = {k[len("ema.model."):]: v for k, v in state.items() if k.startswith("ema.model.")}
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(tensor, ema[name], msg=name)

    # sample.py lora=FILE on the base draws what sample.py ckpt=<the run's checkpoint> draws (both: base + EMA adapter)
    base_ckpt = base.split("=", 1)[1]
    args = ["prompt=a red circle", "grid=false", "n_images=1", "seed=3"]
    with_file = sample(ckpt_config(base_ckpt, tmp_path / "file", *args, f"lora=[{file}]"))
    from_run = sample(ckpt_config(result["last_checkpoint"], tmp_path / "run", *args))
    plain = sample(ckpt_config(base_ckpt, tmp_path / "plain", *args))
    pixels = [np.asarray(Image.open(p[0])).astype(int) for p in (with_file, from_run, plain)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # the same weights, merged by two paths (rounding)
    assert np.abs(pixels[0] - pixels[2]).max() > 1  # and the adapter changed the picture
    # and in tensors: the checkpoint's merged U-Net = the (seeded, same) base with the file's adapter hooked on
    L.seed_everything(cfg.seed)
    fresh = build_diffusion_module(cfg)  # its own adapter starts at dW = 0
    lora.network(fresh.adapter_roots()).attach(fresh.adapter_roots())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_bundle(result["last_checkpoint"]).unet(x, t, c), fresh.unet(x, t, c),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_start_from_a_file_of_the_same_type(tiny_cfg, tmp_path, kind):
    module = build_diffusion_module(tiny_cfg(f"adapter={kind}"))
    with torch.no_grad():
        for p in module.lora.parameters():
            p.add_(torch.randn_like(p))
    path = save_lora_file(module.lora, module.adapter_roots(), tmp_path / "start.safetensors")
    started = build_diffusion_module(tiny_cfg(f"adapter={kind}", f"adapter.init_from={path}"))
    for k, v in module.lora.state_dict().items():
        torch.testing.assert_close(started.lora.state_dict()[k], v)
    other = "loha" if kind != "loha" else "lokr"
    with pytest.raises(ConfigError, match="adapter.type"):
        build_diffusion_module(tiny_cfg(f"adapter={other}", f"adapter.init_from={path}"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, base, kind):  # noqa: F811
    args = [base, f"adapter={kind}", "adapter.preset=attention_ff", "optim.lr=1e-2"]
    ref, run = stopped_and_resumed(tmp_path, *args)
    a = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k in a:  # the raw adapter too (assert_same_run compares the EMA)
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)
