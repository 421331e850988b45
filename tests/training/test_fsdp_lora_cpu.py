"""LoRA under sharded training, on 2 CPU ranks (gloo) with torch's FSDP2 (`fully_shard`): the frozen U-Net sharded
at `trainer=fsdp`'s blocks, the adapter (`ldm.models.lora.LoRANetwork`, preset=full: attention Linears and ResBlock
convs) trainable. The adapter is not a submodule of the U-Net (it acts through forward hooks), so U-Net and adapter
are one module here and the adapter lies in FSDP's root unit: all-gathered before the U-Net's forward, where the
hooks read it, and its gradients reduce-scattered after the backward; each rank keeps half of every adapter tensor
and of its AdamW state. The base stays frozen and is in no optimizer or checkpoint (as an adapter run's checkpoint,
`ldm.training.module.trained.lora.PREFIXES`).

Checked against one process on the whole batch: the adapter after 2 steps (fp32, 1e-5: only the order of the
gradient sums differs) and the untouched base; the full adapter state dict (gathered); a sharded checkpoint of the
adapter and its optimizer state (torch.distributed.checkpoint, one file per rank) resumed on 2 ranks continues
exactly (bit for bit) like an uninterrupted sharded run; and the sharded checkpoint joined into one file exports a
kohya LoRA file (`ldm.formats.lora_files.save_lora_file`) that reads back as the gathered adapter."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.fsdp import (adapter_only, adapter_optimizer, free_port, make_lora_model, make_unet, shard,
                                 train_steps)

pytestmark = pytest.mark.slow  # 2 spawned processes, ~20-40 s on the shared CPUs


def sharded_model():
    model = make_lora_model()
    return shard(model, model.unet)


def worker(rank, port, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def sharded_state(model, opt):  # the adapter and its optimizer state, each rank its shards
        return {"model": adapter_only(get_model_state_dict(model)), "optim": get_optimizer_state_dict(model, opt)}

    try:
        model = sharded_model()
        opt = adapter_optimizer(model)
        local = sum(p.to_local().numel() for p in model.lora.parameters())
        total = sum(p.numel() for p in model.lora.parameters())
        assert local < 0.6 * total, f"rank {rank} holds {local} of {total} adapter parameters: not sharded"
        train_steps(model, opt, range(2), rank)
        after_2 = get_model_state_dict(model, options=full)
        if rank == 0:
            torch.save(after_2, f"{out}/full-after-2.pt")
        dcp.save(sharded_state(model, opt), checkpoint_id=f"{out}/sharded-2")
        train_steps(model, opt, range(2, 4), rank)  # uninterrupted: steps 2 and 3
        uninterrupted = adapter_only(get_model_state_dict(model, options=full))

        model = sharded_model()  # a fresh process state: resume from the sharded checkpoint
        opt = adapter_optimizer(model)
        state = sharded_state(model, opt)
        dcp.load(state, checkpoint_id=f"{out}/sharded-2")
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))  # the base: as built
        set_optimizer_state_dict(model, opt, state["optim"])
        train_steps(model, opt, range(2, 4), rank)
        resumed = adapter_only(get_model_state_dict(model, options=full))
        if rank == 0:
            torch.save({"uninterrupted": uninterrupted, "resumed": resumed}, f"{out}/resume.pt")
    finally:
        dist.destroy_process_group()


def test_lora_on_a_sharded_unet_on_two_cpu_ranks(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ldm.formats.lora_files import read_lora_file, save_lora_file

    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2)

    torch.set_num_threads(1)
    model = make_lora_model()
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    train_steps(model, adapter_optimizer(model), range(2))
    gathered = torch.load(tmp_path / "full-after-2.pt", weights_only=True)
    reference = model.state_dict()
    assert gathered.keys() == reference.keys(), "the full state dict has the plain model's keys"
    for key, value in reference.items():
        torch.testing.assert_close(gathered[key], value, atol=1e-5, rtol=1e-5, msg=key)
    for key, value in base.items():
        assert torch.equal(gathered[f"unet.{key}"], value), f"the frozen base changed at {key}"
    ups = [v for k, v in adapter_only(gathered).items() if k.endswith("up.weight")]
    assert ups and all(u.abs().sum() > 0 for u in ups), "every adapter trained (its up-projection left zero)"

    runs = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert runs["uninterrupted"].keys() == adapter_only(reference).keys()
    for key, value in runs["uninterrupted"].items():
        assert torch.equal(runs["resumed"][key], value), f"resume from the sharded checkpoint differs at {key}"

    # export from the sharded checkpoint: join the per-rank shards, load the adapter into a plain network, write
    # the LoRA file, read it back onto a plain U-Net
    dcp_to_torch_save(tmp_path / "sharded-2", tmp_path / "joined.pt")
    joined = torch.load(tmp_path / "joined.pt", weights_only=False)["model"]
    assert joined.keys() == adapter_only(gathered).keys(), "the sharded checkpoint holds the adapter only"
    plain = make_lora_model()
    plain.load_state_dict(joined, strict=False)
    path = save_lora_file(plain.lora, {"unet": plain.unet}, tmp_path / "lora.safetensors")
    read = read_lora_file(path, {"unet": make_unet()})
    assert not read.unmapped and len(read.weights) == len(plain.lora.loras)
    by_path = {p: k for k, p in plain.lora.paths.items()}
    for (root, module_path), parts in read.weights.items():
        key = by_path[(root, module_path)]
        for name in ("down", "up"):
            assert torch.equal(parts[name], gathered[f"lora.loras.{key}.{name}.weight"]), f"{key}.{name}"
