"""Helpers for distributed strategies."""

from __future__ import annotations


def unet_block_wrap_policy() -> set[type]:
    """FSDP auto-wrap policy: shard at the U-Net's residual and transformer blocks (Lightning accepts a set of
    module classes as the policy)."""
    from ldm.models.unet import BasicTransformerBlock, ResBlock

    return {ResBlock, BasicTransformerBlock}
