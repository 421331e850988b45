"""Which optimizer steps are applied: a NaN/inf loss or gradient norm, or a spike far above its running level,
skips the update (the weights, the EMA and the logged loss then ignore that step)."""

from __future__ import annotations

import math
from typing import Any


class DivergenceGuard:
    """Running levels of the loss and of the gradient norm, and the verdict on each step.

    The running level is a bias-corrected exponential moving average over the *accepted* steps (skipped ones never
    move it). A step is skipped when its loss or gradient norm is not finite, or, once a level exists, exceeds
    ``factor`` x that level (``loss_factor`` / ``grad_norm_factor``; None disables that check). Diffusion losses
    vary per batch with the random timesteps by a few x at most, so the default factors of 100 catch a blow-up
    (lr far too high: the loss jumps by orders of magnitude) without ever skipping healthy steps.

    Args:
        loss_factor, grad_norm_factor: spike thresholds relative to the running level; None: off.
        momentum: the moving average's decay (0.98: about the last 50 accepted steps).
        max_skipped_in_a_row: the run stops (``FloatingPointError``) after this many skipped steps in a row.
    """

    def __init__(self, loss_factor: float | None = 100.0, grad_norm_factor: float | None = 100.0,
                 momentum: float = 0.98, max_skipped_in_a_row: int = 5):
        for name, value in (("loss_factor", loss_factor), ("grad_norm_factor", grad_norm_factor)):
            if value is not None and not float(value) > 1.0:
                raise ValueError(f"{name} must be > 1 (or null to disable the check), got {value!r}")
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {momentum!r}")
        if int(max_skipped_in_a_row) < 1:
            raise ValueError(f"max_skipped_in_a_row must be >= 1, got {max_skipped_in_a_row!r}")
        self.loss_factor = None if loss_factor is None else float(loss_factor)
        self.grad_norm_factor = None if grad_norm_factor is None else float(grad_norm_factor)
        self.momentum = float(momentum)
        self.max_skipped_in_a_row = int(max_skipped_in_a_row)
        self.levels = {"loss": _Level(), "grad_norm": _Level()}
        self.skipped_in_a_row = 0
        self.nonfinite_total = 0
        self.diverged_total = 0

    def verdict(self, loss: float, grad_norm: float | None = None) -> str | None:
        """None when the step may be applied, else why not (the check does not change any state)."""
        values = {"loss": loss, "grad_norm": grad_norm}
        factors = {"loss": self.loss_factor, "grad_norm": self.grad_norm_factor}
        for name, value in values.items():
            if value is not None and not math.isfinite(value):
                return f"non-finite {name} ({value})"
        for name, value in values.items():
            level = self.levels[name].value(self.momentum)
            if value is not None and factors[name] is not None and level is not None and value > factors[name] * level:
                return f"{name} {value:.4g} is over {factors[name]:g} x its running level {level:.4g}"
        return None

    def accept(self, loss: float, grad_norm: float | None = None) -> None:
        self.skipped_in_a_row = 0
        self.levels["loss"].update(loss, self.momentum)
        if grad_norm is not None:
            self.levels["grad_norm"].update(grad_norm, self.momentum)

    def skip(self, reason: str) -> None:
        """Count a skipped step."""
        self.skipped_in_a_row += 1
        if reason.startswith("non-finite"):
            self.nonfinite_total += 1
        else:
            self.diverged_total += 1

    def stop_if_persistent(self, reason: str) -> None:
        """FloatingPointError after max_skipped_in_a_row skipped steps in a row."""
        if self.skipped_in_a_row >= self.max_skipped_in_a_row:
            raise FloatingPointError(
                f"{self.skipped_in_a_row} steps in a row were skipped (the last: {reason}); stopping. The weights "
                "were not updated by those steps and no checkpoint of diverged weights was written. Lower optim.lr, "
                "enable gradient clipping (trainer.gradient_clip_val), or use precision=32 / bf16.")

    def state_dict(self) -> dict[str, Any]:
        return {"levels": {k: v.__dict__.copy() for k, v in self.levels.items()},
                "skipped_in_a_row": self.skipped_in_a_row, "nonfinite_total": self.nonfinite_total,
                "diverged_total": self.diverged_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.get("levels", {}).items():
            self.levels[k].__dict__.update(v)
        for k in ("skipped_in_a_row", "nonfinite_total", "diverged_total"):
            setattr(self, k, int(state.get(k, 0)))


class _Level:
    """Bias-corrected exponential moving average (Adam's first moment, Kingma & Ba 2015, Alg. 1)."""

    def __init__(self):
        self.average, self.count = 0.0, 0

    def update(self, value: float, momentum: float) -> None:
        self.average = momentum * self.average + (1.0 - momentum) * float(value)
        self.count += 1

    def value(self, momentum: float) -> float | None:
        return self.average / (1.0 - momentum ** self.count) if self.count else None
