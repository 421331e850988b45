"""What `trainer=fsdp2` shards (ldm/training/module/sharded/fsdp2.py), on one gloo rank in this process (fast; the
2-rank train.py runs are tests/training/test_fsdp2_train.py, slow): the U-Net's blocks and the U-Net are FSDP2
units, an adapter and its EMA copy (read by hooks) are in the U-Net's unit, the frozen VAE and text encoder are
left whole; a learning text encoder is refused; a module with no mesh (any other strategy) is left alone."""

import pytest
import torch
import torch.distributed as dist

from ldm.training.run.train import build_diffusion_module
from tests.helpers.fsdp import free_port
from tests.helpers.training import tiny_cfg  # noqa: F401 (a fixture)


@pytest.fixture
def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def test_the_denoiser_and_its_adapter_are_sharded_the_frozen_networks_not(tiny_cfg, mesh):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from ldm.models.unet import BasicTransformerBlock, ResBlock
    from ldm.training.module.sharded.fsdp2 import is_sharded, shard_module

    module = build_diffusion_module(tiny_cfg("adapter=lora", "module.ema_decay=0.9"))
    shard_module(module, None)  # no mesh: DDP, one device
    assert not is_sharded(module)
    shard_module(module, mesh)
    blocks = [m for m in module.unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    assert blocks and all(isinstance(m, FSDPModule) for m in blocks) and isinstance(module.unet, FSDPModule)
    assert all(isinstance(p, DTensor) for p in module.lora.parameters())
    assert all(isinstance(p, DTensor) for p in module.ema.model.parameters())
    assert not isinstance(module.lora, FSDPModule) and not isinstance(module.ema.model, FSDPModule), \
        "an adapter and its EMA have no forward: they are gathered with the U-Net, whose hooks read them"
    for frozen in (module.autoencoder, module.text_encoder):
        assert not any(isinstance(p, DTensor) for p in frozen.parameters())
    assert not [k for k in module.state_dict() if "_sharded_with_it" in k], "the state-dict keys stay the module's"
    shard_module(module, mesh)  # configure_model again (validate after fit): nothing more


def test_a_whole_unet_ema_is_its_own_unit(tiny_cfg, mesh):
    from torch.distributed.fsdp import FSDPModule

    from ldm.training.module.sharded.fsdp2 import shard_module, whole_weights

    module = build_diffusion_module(tiny_cfg("module.ema_decay=0.9"))
    shard_module(module, mesh)
    assert isinstance(module.ema.model, FSDPModule), "sampled through its own forward"
    with whole_weights(module):
        assert all(type(p) is torch.nn.Parameter for p in module.unet.parameters())


def test_a_learning_text_encoder_is_refused(tiny_cfg, mesh):
    from ldm.training.module.sharded.fsdp2 import shard_module

    module = build_diffusion_module(tiny_cfg("adapter=lora", "adapter.text_encoder=true"))
    with pytest.raises(ValueError, match="adapter.text_encoder.*trainer=ddp"):
        shard_module(module, mesh)


def test_a_sharded_checkpoint_folder_is_replaced_whole_and_a_killed_save_removed(tmp_path):
    from ldm.training.build.sharded_checkpoint_io import replace_folder
    from ldm.training.run.resume import AtomicCheckpointIO

    last, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.tmp"
    for folder, text in ((last, "old"), (new, "new")):
        folder.mkdir()
        (folder / "__0_0.distcp").write_text(text)
    replace_folder(new, last)
    assert (last / "__0_0.distcp").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    killed = tmp_path / ".step-4.ckpt.tmp"  # a save killed before every rank wrote: removed at the next start
    killed.mkdir()
    (killed / "__1_0.distcp").write_text("partial")
    assert AtomicCheckpointIO.remove_stale(tmp_path) == [killed] and not killed.exists() and last.is_dir()
