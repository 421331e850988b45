"""Lightning's FSDP2 path (`ModelParallelStrategy`) on CPU ranks with gloo, for
tests/training/test_fsdp_lightning_cpu.py:

    python -m tests.helpers.fsdp_lightning OUT --steps N [--resume CKPT]

trains the tiny frozen U-Net's LoRA (tests.helpers.fsdp.make_lora_model) on 2 CPU processes that Lightning starts
(`devices=2`: it runs this command again for rank 1), sharded by `configure_model` over the data-parallel mesh,
from checkpoint CKPT if given. A ModelCheckpoint writes OUT/checkpoints/step-2.ckpt, step-4.ckpt, ...: sharded
checkpoints (a folder, a file per rank); at the end OUT/full.ckpt is written gathered (one file, rank 0) and the
gathered adapter goes to OUT/adapter.pt. Each rank takes every second sample of each global batch of 4, 2 steps
an epoch, in the same order every epoch."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler

from tests.helpers.fsdp import adapter_only, adapter_optimizer, batch, make_lora_model, shard

STEPS_PER_EPOCH = 2


class LoRAOnShardedUNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = make_lora_model()

    def configure_model(self):  # ModelParallelStrategy: the module is sharded here, before the optimizer is built
        shard(self.model, self.model.unet, mesh=self.device_mesh["data_parallel"])

    def training_step(self, samples, batch_idx):
        x, t, c, eps = samples
        return (self.model(x, t, c) - eps).pow(2).mean()

    def configure_optimizers(self):
        return adapter_optimizer(self.model)

    def train_dataloader(self):  # not shuffled: the one-process reference sees the same batches each epoch
        data = samples()
        ranks = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                   shuffle=False)
        return DataLoader(data, batch_size=2, sampler=ranks)


def samples() -> list[tuple]:
    """The samples of steps 0 and 1 of `tests.helpers.fsdp.batch`, in order: the sampler gives rank r every
    second one, so the ranks' halves of step s are the 4 samples of batch(s)."""
    return [tuple(v[i] for v in batch(step)) for step in range(STEPS_PER_EPOCH) for i in range(4)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--resume")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=True)
    every = ModelCheckpoint(out / "checkpoints", filename="step-{step}", auto_insert_metric_name=False,
                            every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                        callbacks=[every], use_distributed_sampler=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    module = LoRAOnShardedUNet()
    trainer.fit(module, ckpt_path=args.resume)
    strategy._save_distributed_checkpoint = False  # the same run's state, gathered into one file
    trainer.save_checkpoint(out / "full.ckpt")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:
        torch.save(adapter_only(full), out / "adapter.pt")


if __name__ == "__main__":
    main()
