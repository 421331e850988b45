"""2-process DDP on CPU (gloo): both ranks end with identical weights and every sample of the epoch is used
exactly once across the ranks."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from ldm.training.run.train import build_diffusion_module
from tests.helpers.training import RecordSeen


def test_two_process_ddp(tiny_cfg, tmp_path):
    cfg = tiny_cfg("data.train.size=32", "data.batch_size=4", "trainer.limit_val_batches=0")
    L.seed_everything(0)
    module = build_diffusion_module(cfg)
    initial = {k: v.clone() for k, v in module.unet.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[RecordSeen(str(tmp_path))])
    trainer.fit(module, datamodule=instantiate(cfg.data))
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 16
    assert sorted(seen[0] + seen[1]) == list(range(32))  # disjoint, and the whole epoch
    a, b = (torch.load(tmp_path / f"unet{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], initial[k]) for k in a if a[k].is_floating_point())  # it did train


class RecordAdapter(RecordSeen):
    """Writes each rank's final adapter and base U-Net weights."""

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        Path(self.out, f"seen{rank}.json").write_text(json.dumps(self.seen))
        torch.save({"lora": pl_module.lora.state_dict(), "unet": pl_module.unet.state_dict()},
                   Path(self.out, f"weights{rank}.pt"))


@pytest.mark.parametrize("kind", ["lora", *(pytest.param(k, marks=pytest.mark.slow) for k in ("loha", "lokr", "dora"))])
def test_two_process_ddp_with_a_lora_adapter(tiny_cfg, tmp_path, kind):
    """adapter=lora (loha, lokr, dora) under DDP: the frozen base is not wrapped for gradients (no unused-parameter
    error), both ranks end with identical adapters that did train, the base is untouched, and the ranks split the
    epoch."""
    from tests.helpers.training import TINY_MODEL, compose_train
    from ldm.training.run.train import train

    ckpt = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            "+callbacks.checkpoint.save_last=true", "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"]
    base = train(compose_train(tmp_path / "base", TINY_MODEL + ckpt + ["optim.lr=3e-2", "trainer.max_steps=4"]))
    cfg = tiny_cfg(f"model.pretrained={base['last_checkpoint']}", f"adapter={kind}", "adapter.preset=full",
                   "adapter.rank=2", "optim.lr=1e-2", "module.ema_decay=null", "data.train.size=32",
                   "data.batch_size=4", "trainer.limit_val_batches=0")
    L.seed_everything(0)
    module = build_diffusion_module(cfg)
    initial = {k: v.clone() for k, v in module.lora.state_dict().items()}
    base_unet = {k: v.clone() for k, v in module.unet.state_dict().items() if "lora" not in k}
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[RecordAdapter(str(tmp_path))],
                        default_root_dir=str(tmp_path))  # where the run's lora.safetensors goes (not the cwd)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == list(range(32))
    a, b = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert any(not torch.equal(a["lora"][k], initial[k]) for k in initial if not k.endswith("alpha"))
    unet = {k: v for k, v in a["unet"].items() if k in base_unet}
    assert unet.keys() == base_unet.keys() and all(torch.equal(unet[k], base_unet[k]) for k in base_unet)
