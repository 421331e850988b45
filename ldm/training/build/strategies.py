"""Helpers for distributed strategies: the blocks FSDP shards at, and `trainer=fsdp2`'s strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy


def unet_block_wrap_policy() -> set[type]:
    """FSDP auto-wrap policy: shard at the U-Net's residual and transformer blocks (Lightning accepts a set of
    module classes as the policy); trainer=fsdp2 shards at the same blocks (``ldm.training.module.sharded.fsdp2``)."""
    from ldm.training.module.sharded.fsdp2 import unet_blocks

    return unet_blocks()


class ShardedDataParallel(ModelParallelStrategy):
    """FSDP2 (torch's ``fully_shard``) data parallelism through Lightning's ``ModelParallelStrategy``: one
    data-parallel mesh over every rank (``data_parallel_size`` = world size, no tensor parallelism); the module
    shards itself in ``configure_model`` (``ldm.training.module.sharded.fsdp2``). Unlike ``FSDPStrategy`` it runs on CPU
    ranks (gloo) as well as on GPUs.

    ``save_distributed_checkpoint=True``: a checkpoint is a folder (one file of shards per rank + ``meta.pt``),
    written into ``.<name>.tmp`` and renamed when every rank has written (a killed save leaves the previous
    checkpoint); False: gathered on rank 0 into one file (our ``AtomicCheckpointIO``)."""

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # before the mesh is made (super)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        if (checkpoint.get("ldm") or {}).get("refused"):
            return  # weights that diverged (CheckpointGate): the previous checkpoint stays the last
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from ldm.training.build.sharded_checkpoint_io import replace_folder

        path = Path(self.broadcast(filepath))
        tmp = path.with_name(f".{path.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("sharded checkpoint written")
        if self.global_rank == 0:
            replace_folder(tmp, path)
        self.barrier("sharded checkpoint in place")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from ldm.training.build.sharded_checkpoint_io import load_sharded_checkpoint

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only)
        return load_sharded_checkpoint(path, self.model, self.optimizers, self.lightning_module.strict_loading)
