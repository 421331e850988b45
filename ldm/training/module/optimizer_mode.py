"""Optimizers whose parameters hold different weights for training and for inference (schedule-free AdamW).

Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled") takes its gradient at
y_t = (1 - beta1) z_t + beta1 x_t while the weights to evaluate are the average x_t; ``optimizer.eval()`` moves the
parameters from y to x in place and ``optimizer.train()`` back (a lerp towards the state's z). The library asks for
train() before training steps and eval() for evaluation and checkpoints. ``OptimizerModes`` calls them for
LatentDiffusion at its documented points, without the module knowing the optimizer's name:

- training steps: the parameters hold y (``start_training`` before the first one);
- ``inference_weights()``: validation, sampling callbacks, the EMA update (the EMA averages x), the run's files;
- checkpoints (``save``): ``state_dict`` holds x (what sampling and export read), ``ldm.train_weights`` holds y;
  ``restore_train_weights`` puts y back before Lightning loads the weights to resume.

x -> y -> x in floating point is not an identity, so leaving inference never calls train() alone: it copies back
the y saved on entry. A run that validates, samples or writes a checkpoint therefore trains on bit for bit the same
weights as one that does not, and a resumed run continues from exactly the y it stopped at. The cost is one copy
of the trained parameters while inside inference (and in each checkpoint). An optimizer without train()/eval()
gets ``NO_MODES``: nothing is switched or copied."""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ldm.models.bundle import ModelBundle

TRAIN_WEIGHTS = "train_weights"  # checkpoint["ldm"][TRAIN_WEIGHTS]: {state-dict key: y}


@runtime_checkable
class ModeSwitching(Protocol):
    """An optimizer whose parameters hold training weights after train() and inference weights after eval()."""

    def train(self) -> Any: ...

    def eval(self) -> Any: ...


class OptimizerModes:
    def __init__(self, optimizer: ModeSwitching, params: list[nn.Parameter]):
        self.optimizer, self.params = optimizer, params
        self._train_weights: list[Tensor] | None = None  # y, while the parameters hold x
        self._depth = 0  # nested inference blocks (a sampling callback during validation)

    @torch.no_grad()
    def _copy(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def _train_with(self, weights: list[Tensor]) -> None:
        """The optimizer in train mode with exactly ``weights`` (y) in the parameters, whatever mode it was in
        (a checkpoint written during validation stores eval mode)."""
        self.optimizer.train()
        torch._foreach_copy_(self.params, weights)

    def start_training(self) -> None:
        """Before the first training step (fresh, or resumed: the parameters hold y either way)."""
        self._train_with(self._copy())

    def to_inference(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        y = self._copy()
        self._train_with(y)
        self.optimizer.eval()
        self._train_weights = y

    def to_training(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            y, self._train_weights = self._train_weights, None
            self._train_with(y)

    @contextmanager
    def inference_weights(self) -> Iterator[None]:
        """The parameters hold x for the block; exactly the y of before afterwards."""
        self.to_inference()
        try:
            yield
        finally:
            self.to_training()

    def own_copies(self, bundle: ModelBundle) -> ModelBundle:
        """Inside ``inference_weights()``: ``bundle`` with a copy of each network that holds trained parameters
        (which go back to y when the block ends), so that it keeps x."""
        trained = {id(p) for p in self.params}
        copies = {name: copy.deepcopy(getattr(bundle, name)) for name in ("unet", "text_encoder")
                  if any(id(p) in trained for p in getattr(bundle, name).parameters())}
        return dataclasses.replace(bundle, **copies) if copies else bundle

    @torch.no_grad()
    def save(self, checkpoint: dict[str, Any], names: dict[int, str]) -> None:
        """x into ``checkpoint["state_dict"]`` (what inference reads), y beside it under ``ldm.train_weights``
        (what a resumed run trains on). ``names``: parameter id -> state-dict key."""
        keys = [names.get(id(p)) for p in self.params]
        state = checkpoint["state_dict"]
        missing = [k for k in keys if k not in state]
        if missing:
            raise RuntimeError(f"{len(missing)} parameters of the optimizer are not in the checkpoint's state dict "
                               f"(e.g. {missing[:3]}): their inference weights cannot be written")
        with self.inference_weights():
            y, x = self._train_weights, self._copy()  # y: the outermost block's (x since then)
        checkpoint["state_dict"].update(zip(keys, x))
        checkpoint.setdefault("ldm", {})[TRAIN_WEIGHTS] = dict(zip(keys, y))


class NoModes:
    """An optimizer with one set of weights: nothing to switch."""

    def start_training(self) -> None:
        pass

    def to_inference(self) -> None:
        pass

    def to_training(self) -> None:
        pass

    @contextmanager
    def inference_weights(self) -> Iterator[None]:
        yield

    def own_copies(self, bundle: ModelBundle) -> ModelBundle:
        return bundle

    def save(self, checkpoint: dict[str, Any], names: dict[int, str]) -> None:
        pass


NO_MODES = NoModes()


def optimizer_modes(optimizer: Any) -> OptimizerModes | NoModes:
    """The mode switch for ``optimizer`` (Lightning's wrapper or the optimizer itself): ``NO_MODES`` unless it has
    train()/eval()."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch optimizer
    if not isinstance(optimizer, ModeSwitching):
        return NO_MODES
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return OptimizerModes(optimizer, params)


def restore_train_weights(checkpoint: dict[str, Any]) -> None:
    """Before Lightning loads a checkpoint's weights to resume: y (the training weights) in place of the x that
    ``OptimizerModes.save`` wrote to ``state_dict`` for inference. A checkpoint without them is left alone."""
    y = (checkpoint.get("ldm") or {}).pop(TRAIN_WEIGHTS, None)
    if y:
        checkpoint["state_dict"].update(y)
