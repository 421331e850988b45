"""Lightning's FSDP2 path (`ModelParallelStrategy`) on CPU ranks with gloo, for tests/training/test_fsdp_lightning_cpu.py:

    python -m tests.helpers.fsdp_lightning OUT --steps N [--resume CKPT] [--save CKPT] [--full]

trains the tiny frozen U-Net's LoRA (tests.helpers.fsdp.make_lora_model) on 2 CPU processes that Lightning starts
(`devices=2`: it runs this command again for rank 1), sharded by `configure_model` over the data-parallel mesh,
from checkpoint CKPT if given; then writes the gathered adapter to OUT/adapter.pt and, with --save, the trainer's
checkpoint to CKPT (a folder of per-rank shards; --full: one file gathered on rank 0). Each rank takes half of
every global batch of 4 (Lightning's DistributedSampler), 2 steps an epoch (a stop at an epoch's end resumes
exactly without a resumable sampler)."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

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


def samples() -> list[tuple]:
    """The samples of steps 0 and 1 of `tests.helpers.fsdp.batch`, in order: the sampler gives rank r every
    second one, so the ranks' halves of step s are the 4 samples of batch(s)."""
    return [tuple(v[i] for v in batch(step)) for step in range(STEPS_PER_EPOCH) for i in range(4)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--resume")
    p.add_argument("--save")
    p.add_argument("--full", action="store_true", help="--save one gathered file, not per-rank shards")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=not args.full)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=args.out)
    module = LoRAOnShardedUNet()
    trainer.fit(module, DataLoader(samples(), batch_size=2), ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:
        torch.save(adapter_only(full), Path(args.out) / "adapter.pt")


if __name__ == "__main__":
    main()
