"""What the FSDP2 CPU stand-ins share (tests/training/test_fsdp_cpu.py, test_fsdp_lora_cpu.py): the tiny U-Net,
seeded batches, the training loop whose ranks each take half of the global batch, and the sharding at
`trainer=fsdp`'s wrap policy."""

import socket

import torch
from torch import nn


def make_unet():
    from ldm.models.unet import UNet

    torch.manual_seed(0)
    return UNet(in_channels=4, out_channels=4, model_channels=64, channel_mult=[1, 1], attention_levels=[1],
                num_head_channels=32, context_dim=32, num_res_blocks=1)


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g),
            torch.randn(4, 5, 32, generator=g), torch.randn(4, 4, 8, 8, generator=g))


def train_steps(model, opt, steps, rank=None):
    for step in steps:
        x, t, c, eps = batch(step)
        if rank is not None:  # each rank: its half of the global batch (the mean over ranks = the mean of all)
            x, t, c, eps = (v[rank * 2:rank * 2 + 2] for v in (x, t, c, eps))
        (model(x, t, c) - eps).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def shard(model: nn.Module, unet: nn.Module, mesh=None) -> nn.Module:
    """fully_shard each block of `unet` that `trainer=fsdp`'s wrap policy names, then `model` as the root unit
    (`mesh`: the data-parallel device mesh; None: all ranks)."""
    from torch.distributed.fsdp import fully_shard

    from ldm.training.build.strategies import unet_block_wrap_policy

    blocks = tuple(unet_block_wrap_policy())
    for module in unet.modules():
        if isinstance(module, blocks):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class UNetWithLoRA(nn.Module):
    """The U-Net and its adapter as one module: FSDP's root unit holds the adapter (the adapter is not a submodule
    of the U-Net: it acts through forward hooks, reading its weights, all-gathered before the U-Net's forward)."""

    def __init__(self, unet: nn.Module, lora: nn.Module):
        super().__init__()
        self.unet, self.lora = unet, lora

    def forward(self, x, t, c):
        return self.unet(x, t, c)


def make_lora_model() -> UNetWithLoRA:
    """The tiny U-Net, frozen, with a fresh LoRA (preset=full: attention Linears and ResBlock convs)."""
    from ldm.models.lora import LoRAConfig, LoRANetwork

    unet = make_unet()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained base's stand-in: a fresh U-Net's zeroed output convs pass adapters no gradient
        for p in unet.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    unet.requires_grad_(False)
    torch.manual_seed(2)
    lora = LoRANetwork.build({"unet": unet}, LoRAConfig(preset="full", rank=4, conv_rank=2))
    return UNetWithLoRA(unet, lora.attach({"unet": unet}))


def adapter_optimizer(model: UNetWithLoRA):
    # lr as the U-Net stand-in's: Adam divides by |gradient|, so at 1e-2 the order of the gradient sums (1e-7
    # apart between 1 and 2 ranks) showed as 1.5e-5 in a few adapter weights
    return torch.optim.AdamW(model.lora.parameters(), lr=1e-3)


def adapter_only(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("lora.")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
