"""What the rest of ldm may ask of a network, written down (``typing.Protocol``) instead of probed with getattr.

Every network of a bundle follows one of these: the U-Net (later any denoiser), the first stage (``AutoencoderKL``,
or ``IdentityAutoencoder`` for pixel space) and the text encoder (``CLIPTextEncoder``, SDXL's
``DualCLIPTextEncoder``). tests/models/test_protocols.py checks that each of ours does.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """(x_t, t, context) -> the model output (eps / v) of the same shape as x_t."""

    downsample_factor: int  # the spatial sizes it takes are multiples of this

    def __call__(self, x: Tensor, t: Tensor, context: Any) -> Tensor: ...


@runtime_checkable
class Autoencoder(Protocol):
    """Pixels in [-1, 1] <-> scaled latents: z = (E(x) - shift_factor) * scaling_factor."""

    downsample_factor: int  # pixels per latent, per side
    latent_channels: int
    scaling_factor: float
    shift_factor: float

    def encode_latents(self, x: Tensor, sample: bool = True, generator: Any = None) -> Tensor: ...

    def decode_latents(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class TextEncoder(Protocol):
    """Captions -> the denoiser's text context (a tensor, or SDXL's {"crossattn", "pooled"})."""

    frozen: bool  # False: its weights (or an adapter on it) learn: contexts are computed each step, never cached
    max_chunks: int  # prompts longer than 75 tokens: up to this many chunks of 77 (A1111's long prompts)
    zero_uncond: bool  # the unconditional context is zeros (SDXL's force_zeros_for_empty_prompt), not ""'s
    pooled_dim: int | None  # size of the pooled text embedding a U-Net's adm vector takes (SDXL), else None
    context_dim: int
    context_cacheable: bool  # the latent cache stores its contexts (cache_rows); SDXL's pair is encoded live

    def __call__(self, captions: list[str]) -> Any: ...

    def empty_context(self, batch_size: int = 1, chunks: int = 1) -> Any: ...

    def cache_rows(self, context: Any) -> Tensor: ...  # the context as the (B, L, D) tensor the latent cache stores

    def from_cache_rows(self, rows: Tensor) -> Any: ...  # and back (ldm.models.context_rows)


@runtime_checkable
class SeveralEncoders(Protocol):
    """A text encoder made of several (SD3's CLIP-L, CLIP-G, T5), each of which training may drop on its own
    (``module.encoder_dropout``)."""

    encoder_names: tuple[str, ...]

    def drop_encoders(self, context: Any, dropped: Tensor) -> Any: ...  # (B, len(encoder_names)) bool -> zeroed
