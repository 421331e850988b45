"""Sharded training of the U-Net on 2 CPU ranks (gloo) with torch's FSDP2 (`fully_shard`), sharded at the blocks
of `ldm.training.build.strategies.unet_block_wrap_policy` (the policy `trainer=fsdp` gives Lightning).

Lightning 2.6 refuses `FSDPStrategy` on a CPU accelerator ("requires a GPU accelerator", checked in its accelerator
connector), so `trainer=fsdp` itself runs only on a GPU (bench/gpu_fsdp.sh). This is the CPU-side stand-in for the
sharding itself: the same U-Net, the same wrap policy, the same AdamW, on 2 ranks that each hold half of every
block's parameters. Checked: 2 steps equal one process on the whole batch (fp32, 1e-5: only the order of the
gradient sums differs); the full state dict gathered from the shards is the U-Net's own state dict (loads into a
plain UNet, which gives the same output); a sharded checkpoint (torch.distributed.checkpoint, one file per rank)
resumed on 2 ranks continues exactly like an uninterrupted sharded run; and the sharded checkpoint converts to one
plain file (export from a sharded checkpoint)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.fsdp import batch, free_port, make_unet, shard, train_steps

pytestmark = pytest.mark.slow  # 2 spawned processes, ~20-40 s on the shared CPUs


def sharded(rank):
    model = make_unet()
    return shard(model, model), torch.optim.AdamW(model.parameters(), lr=1e-3)


def worker(rank, port, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, opt = sharded(rank)
        local = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        assert local < 0.6 * total, f"rank {rank} holds {local} of {total} parameters: not sharded"
        train_steps(model, opt, range(2), rank)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_full, _ = get_state_dict(model, opt, options=full)
        if rank == 0:
            torch.save(model_full, f"{out}/full-after-2.pt")
        model_sd, opt_sd = get_state_dict(model, opt)  # sharded: each rank writes its own shards
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=f"{out}/sharded-2")
        train_steps(model, opt, range(2, 4), rank)  # uninterrupted: steps 2 and 3
        uninterrupted, _ = get_state_dict(model, opt, options=full)

        model, opt = sharded(rank)  # a fresh process state: resume from the sharded checkpoint
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": opt_sd}
        dcp.load(state, checkpoint_id=f"{out}/sharded-2")
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train_steps(model, opt, range(2, 4), rank)
        resumed, _ = get_state_dict(model, opt, options=full)
        if rank == 0:
            torch.save({"uninterrupted": uninterrupted, "resumed": resumed}, f"{out}/resume.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_unet_on_two_cpu_ranks(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2)

    torch.set_num_threads(1)
    model = make_unet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, opt, range(2))
    gathered = torch.load(tmp_path / "full-after-2.pt", weights_only=True)
    reference = model.state_dict()
    assert gathered.keys() == reference.keys(), "the full state dict has the plain U-Net's keys"
    for key, value in reference.items():
        torch.testing.assert_close(gathered[key], value, atol=1e-5, rtol=1e-5, msg=key)

    plain = make_unet()
    plain.load_state_dict(gathered)  # a full state dict loads into an unsharded U-Net: sampling, export
    x, t, c, _ = batch(0)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, c), model(x, t, c), atol=1e-5, rtol=1e-5)

    runs = torch.load(tmp_path / "resume.pt", weights_only=True)
    for key, value in runs["uninterrupted"].items():
        assert torch.equal(runs["resumed"][key], value), f"resume from the sharded checkpoint differs at {key}"

    # export from a sharded checkpoint: torch's converter joins the per-rank shards into one plain file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "sharded-2", tmp_path / "joined.pt")
    joined = torch.load(tmp_path / "joined.pt", weights_only=False)["model"]
    for key, value in gathered.items():
        assert torch.equal(joined[key], value), key
    exported = make_unet()
    exported.load_state_dict(joined)
