"""DreamBooth's prior-preservation loss (Ruiz et al. 2023, eq. (2)): the instance images' denoising loss plus
``prior_loss_weight`` x the loss on class images sampled from the frozen base model, both in the same step.

    L = E[w_t ||eps - eps_theta(x_t, c_instance)||^2] + lambda * E[w_t' ||eps' - eps_theta(x'_t', c_class)||^2]

As diffusers' examples/dreambooth/train_dreambooth.py: one batch holds the instance rows and the class rows, the
prediction is split into the two parts and each part's loss is a mean over its own rows (so lambda = 1 weighs the
two halves equally, whatever their sizes). Per-sample weights (min-SNR-gamma) are those of each row's own
timestep in both halves, as kohya-ss/sd-scripts train_db.py does (its class rows carry ``loss_weights =
prior_loss_weight`` and every row gets the min-SNR weight). diffusers applies min-SNR to the instance half only,
with weights computed from the whole batch's timesteps (2B of them for B instance rows), and leaves the prior half
plain MSE. Here the prior half keeps the objective the base model was trained with.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def prior_preservation_loss(loss_of: Callable[[Tensor | slice], Tensor], is_prior: Tensor | None,
                            prior_loss_weight: float = 1.0) -> Tensor:
    """``loss_of(rows)``: the mean loss of those rows of the batch. ``is_prior`` (B,) bool marks the class rows;
    None or no class rows: the plain loss of the whole batch (no prior preservation)."""
    if is_prior is None:
        return loss_of(slice(None))
    is_prior = torch.as_tensor(is_prior, dtype=torch.bool)
    if not bool(is_prior.any()):
        return loss_of(slice(None))
    if bool(is_prior.all()):
        raise ValueError("a DreamBooth batch has class (prior) rows only: no instance image to learn from")
    instance = torch.nonzero(~is_prior).flatten()
    prior = torch.nonzero(is_prior).flatten()
    return loss_of(instance) + float(prior_loss_weight) * loss_of(prior)
