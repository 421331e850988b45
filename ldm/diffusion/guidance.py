"""Guidance: classifier-free guidance (Ho & Salimans 2022) in one batched model call, and classifier guidance
(Dhariwal & Nichol 2021) through the gradient of a differentiable scorer of the predicted clean sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor


class DiffusionModel(Protocol):
    """What the samplers call: the U-Net's signature. x (B, C, H, W), t (B,), context (B, L, D) or None."""

    def __call__(self, x: Tensor, t: Tensor, context: Tensor | None) -> Tensor: ...


Context = Tensor | dict[str, Tensor]
"""A cross-attention context (B, L, D), or SGM's conditioner dict {"crossattn": (B, L, D), "vector": (B, A)}
(SDXL: the vector is pooled text + size embeddings); every tensor's first axis is the batch."""


def map_context(fn: Callable[[Tensor], Tensor], context: Context | None) -> Context | None:
    """``fn`` applied to the context tensor, or to every tensor of a conditioner dict."""
    if context is None:
        return None
    if isinstance(context, dict):
        return {k: fn(v) for k, v in context.items()}
    return fn(context)


def context_batch(context: Context) -> int:
    return next(iter(context.values())).shape[0] if isinstance(context, dict) else context.shape[0]


def cat_contexts(a: Context, b: Context) -> Context:
    """[a; b] along the batch (per key for conditioner dicts)."""
    if isinstance(a, dict) != isinstance(b, dict) or (isinstance(a, dict) and a.keys() != b.keys()):
        raise ValueError("the conditional and unconditional contexts have different structures")
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


@dataclass
class Conditioning:
    """The conditional context and the context of the unconditional branch.

    ``uncond_context`` is the empty-prompt encoding, or a negative prompt's encoding when one is given; a batch of
    1 is broadcast to the batch of ``context``.
    """

    context: Context | None = None  # (B, L, D), or a conditioner dict
    uncond_context: Context | None = None  # (B, L, D) or (1, L, D), or a conditioner dict


def classifier_free_guidance(model: DiffusionModel, x: Tensor, t: Tensor, cond: Conditioning | None,
                             scale: float) -> Tensor:
    """out = out_uncond + w (out_cond - out_uncond), both branches in ONE model call with a doubled batch.

    With w == 1, or no unconditional context, this is the plain conditional prediction (one call, batch B).
    The formula is linear, so it applies to eps and v outputs alike.
    """
    context = None if cond is None else cond.context
    if cond is None or cond.uncond_context is None or scale == 1.0:
        return model(x, t, context)
    uncond = cond.uncond_context
    if context is None:
        raise ValueError("classifier-free guidance needs a conditional context as well as the unconditional one")
    batch = context_batch(context)
    if context_batch(uncond) != batch:
        uncond = map_context(lambda u: u.expand(batch, *u.shape[1:]), uncond)
    out = model(torch.cat([x, x]), torch.cat([t, t]), cat_contexts(uncond, context))
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + scale * (out_cond - out_uncond)


def embedded_guidance(model: DiffusionModel, cond: Conditioning | None,
                      scale: float) -> tuple[Conditioning | None, float]:
    """A guidance-distilled model (FLUX.1-dev: ``model.guidance_embeds``) takes the guidance scale as an input,
    ``context["guidance"]`` (B,), and is sampled with the conditional prediction alone (no CFG: diffusers'
    FluxPipeline with true_cfg_scale 1). Returns (the conditioning to use, the CFG scale to apply); other models
    are returned unchanged."""
    if not getattr(model, "guidance_embeds", False) or cond is None or not isinstance(cond.context, dict):
        return cond, scale
    reference = next(iter(cond.context.values()))
    guidance = torch.full((reference.shape[0],), float(scale), device=reference.device)
    return Conditioning({**cond.context, "guidance": guidance}, None), 1.0


Scorer = Callable[[Tensor, Tensor], Tensor]
"""A differentiable scorer: (x0_hat (B, C, H, W), t (B,)) -> log-preference per sample (B,)."""


@dataclass
class ClassifierGuidance:
    """Classifier guidance, as the seed's first guidance method describes it.

    Dhariwal & Nichol 2021, Algorithm 2 in eps form: eps' = eps - s_t * scale * grad_{x_t} log p(y | x_t).
    The scorer reads the predicted clean sample x0-hat(x_t) (the "universal guidance" variant, so any image or
    latent scorer works without training it on noisy inputs); the gradient flows through the denoiser.
    """

    scorer: Scorer
    scale: float = 1.0

    def guided_eps(self, x_t: Tensor, t: Tensor, s: Tensor, denoise: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Return (x0, eps) of the guided prediction; ``denoise(x_t) -> (x0, eps)`` is differentiable in x_t."""
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            x0, eps = denoise(x_in)
            score = self.scorer(x0, t).sum()
            (grad,) = torch.autograd.grad(score, x_in)
        s = s.to(device=x_t.device, dtype=x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        eps = eps.detach() - s * self.scale * grad
        a = (1 - s**2).sqrt()
        x0 = (x_t - s * eps) / a  # eq. (15) with the guided eps
        return x0, eps
