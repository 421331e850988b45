"""Which optimizer steps are applied: a NaN/inf loss or gradient norm, or a spike far above its running level,
skips the update (the weights, the EMA and the logged loss then ignore that step).

The verdict of a training step is taken on the device (``DivergenceGuard.record``): the running levels and the
counters live there as float64 scalars, and the step returns whether it is applied as a device bool. The host
mirror (``levels``, ``skipped_in_a_row``, ``nonfinite_total``, ...) is brought up to date by ``sync`` at the
documented sync points only (ldm.training.module.host_sync): the logging steps and checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

NAMES = ("loss", "grad_norm")
# the device state, in the order it is copied to the host: running levels, counters, and the last skipped step's
# reason (code: 1 / 2 non-finite loss / gradient norm, 3 / 4 their spikes; the value, the level it was judged by)
FIELDS = ("loss_average", "loss_count", "grad_norm_average", "grad_norm_count", "skipped_in_a_row",
          "nonfinite_total", "diverged_total", "overflows", "stopped", "applied", "last_code", "last_value",
          "last_level", "last_step")


@dataclass
class Report:
    """What the host learns at a logging step about the steps since the previous one."""

    applied: bool  # the last recorded step was applied
    skipped: int  # steps the guard skipped since the previous report
    overflows: int  # fp16 loss-scale overflows since the previous report (the GradScaler's skips)
    reason: str | None  # why the last skipped step was skipped (None: no step was ever skipped)
    last_skipped_step: int | None


class DivergenceGuard:
    """Running levels of the loss and of the gradient norm, and the verdict on each step.

    The running level is a bias-corrected exponential moving average over the *accepted* steps (skipped ones never
    move it). A step is skipped when its loss or gradient norm is not finite, or, once a level exists, exceeds
    ``factor`` x that level (``loss_factor`` / ``grad_norm_factor``; None disables that check). Diffusion losses
    vary per batch with the random timesteps by a few x at most, so the default factors of 100 catch a blow-up
    (lr far too high: the loss jumps by orders of magnitude) without ever skipping healthy steps. After
    ``max_skipped_in_a_row`` skipped steps in a row every later step is skipped too, and the host raises at its next
    sync point (``stop_if_persistent``).

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
        self.factors = {"loss": None if loss_factor is None else float(loss_factor),
                        "grad_norm": None if grad_norm_factor is None else float(grad_norm_factor)}
        self.momentum = float(momentum)
        self.max_skipped_in_a_row = int(max_skipped_in_a_row)
        self.levels = {"loss": _Level(), "grad_norm": _Level()}
        self.skipped_in_a_row = self.nonfinite_total = self.diverged_total = self.overflows = 0
        self.last_applied, self.last_reason, self.last_skipped_step = True, None, None
        self._reported = (0, 0)  # (skipped, overflows) totals at the previous report
        self._device: dict[str, Tensor] | None = None  # the state the steps advance (None: the host's is current)

    # ------------------------------------------------------------------------------------- values on the host
    def verdict(self, loss: float, grad_norm: float | None = None) -> str | None:
        """None when a step with these values may be applied, else why not (changes no state)."""
        values = {"loss": loss, "grad_norm": grad_norm}
        for name, value in values.items():
            if value is not None and not math.isfinite(value):
                return reason(name, "non-finite", value)
        for name, value in values.items():
            level, factor = self.levels[name].value(self.momentum), self.factors[name]
            if value is not None and factor is not None and level is not None and value > factor * level:
                return reason(name, "spike", value, level, factor)
        return None

    def accept(self, loss: float, grad_norm: float | None = None) -> None:
        """Count an applied step whose values are on the host."""
        self.skipped_in_a_row = 0
        self.levels["loss"].update(loss, self.momentum)
        if grad_norm is not None:
            self.levels["grad_norm"].update(grad_norm, self.momentum)

    def stop_if_persistent(self, why: str | None) -> None:
        """FloatingPointError after max_skipped_in_a_row skipped steps in a row."""
        if self.skipped_in_a_row >= self.max_skipped_in_a_row:
            raise FloatingPointError(
                f"{self.skipped_in_a_row} steps in a row were skipped (the last: {why}); stopping. The weights "
                "were not updated by those steps and no checkpoint of diverged weights was written. Lower optim.lr, "
                "enable gradient clipping (trainer.gradient_clip_val), or use precision=32 / bf16.")

    # ------------------------------------------------------------------------------------ values on the device
    def record(self, loss: Tensor, grad_norm: Tensor | None, overflow: Tensor | bool, step: int) -> Tensor:
        """Judge an optimizer step on the device and advance the state; returns whether it is applied (a bool
        tensor). ``overflow``: an fp16 loss-scale overflow, which the GradScaler skips and the guard does not
        count. Nothing is read back to the host."""
        s = self._state_on(loss.device)
        values = {"loss": loss.detach().double(),
                  "grad_norm": None if grad_norm is None else grad_norm.detach().double()}
        code, value, level = self._first_failure(s, values)
        failed, stopped = code > 0, s["stopped"] > 0
        overflow = overflow if isinstance(overflow, Tensor) else torch.zeros_like(failed)
        counted, applied = failed & ~overflow & ~stopped, ~failed & ~stopped
        s["skipped_in_a_row"] = torch.where(applied, 0.0, s["skipped_in_a_row"] + counted)
        s["nonfinite_total"] = s["nonfinite_total"] + (counted & (code <= 2))
        s["diverged_total"] = s["diverged_total"] + (counted & (code >= 3))
        s["overflows"] = s["overflows"] + (failed & overflow & ~stopped)
        for name, v in values.items():
            if v is not None:
                average, count = s[f"{name}_average"], s[f"{name}_count"]
                s[f"{name}_average"] = torch.where(applied, moved(average, v, self.momentum), average)
                s[f"{name}_count"] = count + applied
        last = {"last_code": code, "last_value": value, "last_level": level,
                "last_step": torch.full_like(value, float(step))}
        for key, new in last.items():
            s[key] = torch.where(counted, new, s[key])
        s["stopped"] = (stopped | (s["skipped_in_a_row"] >= self.max_skipped_in_a_row)).double()
        s["applied"] = applied.double()
        return applied

    def _first_failure(self, s: dict[str, Tensor], values: dict[str, Tensor | None]) -> tuple[Tensor, ...]:
        """(code, value, level) of the first check the step fails, in ``verdict``'s order (code 0: none)."""
        nan = torch.full_like(s["loss_average"], math.nan)
        checks = [(~torch.isfinite(v), 1 + i, v, nan) for i, v in enumerate(values.values()) if v is not None]
        for i, (name, v) in enumerate(values.items()):
            if v is not None and self.factors[name] is not None:
                count = s[f"{name}_count"]
                level = level_value(s[f"{name}_average"], count, self.momentum)
                checks.append(((count > 0) & (v > self.factors[name] * level), 3 + i, v, level))
        code, value, level = torch.zeros_like(nan), nan, nan
        for failed, c, v, lv in reversed(checks):  # the first failing check is applied last
            code, value = torch.where(failed, c, code), torch.where(failed, v, value)
            level = torch.where(failed, lv, level)
        return code, value, level

    def _state_on(self, device: torch.device) -> dict[str, Tensor]:
        """The device state, made from the host's (a new run, or one just resumed) on the first step."""
        if self._device is None:
            host = self._host_values()
            values = torch.tensor([host[k] for k in FIELDS], dtype=torch.float64).to(device)
            self._device = dict(zip(FIELDS, values.unbind()))
        return self._device

    def _host_values(self) -> dict[str, float]:
        host = dict.fromkeys(FIELDS, 0.0)
        for name in NAMES:
            host[f"{name}_average"], host[f"{name}_count"] = self.levels[name].average, self.levels[name].count
        host.update(skipped_in_a_row=self.skipped_in_a_row, nonfinite_total=self.nonfinite_total,
                    diverged_total=self.diverged_total, overflows=self.overflows, applied=1.0)
        return host

    # ------------------------------------------------------------------------------------------ host sync points
    def sync(self) -> None:
        """Copy the device state to the host mirror (one device-to-host copy; call at a documented sync point)."""
        if self._device is None:
            return
        v = dict(zip(FIELDS, torch.stack([self._device[k] for k in FIELDS]).tolist()))
        for name in NAMES:
            self.levels[name].average, self.levels[name].count = v[f"{name}_average"], int(v[f"{name}_count"])
        self.skipped_in_a_row, self.nonfinite_total = int(v["skipped_in_a_row"]), int(v["nonfinite_total"])
        self.diverged_total, self.overflows = int(v["diverged_total"]), int(v["overflows"])
        self.last_applied = bool(v["applied"])
        code = int(v["last_code"])
        if code:
            name, kind = NAMES[(code - 1) % 2], ("non-finite" if code <= 2 else "spike")
            self.last_reason = reason(name, kind, v["last_value"], v["last_level"], self.factors[name])
            self.last_skipped_step = int(v["last_step"])

    def report(self) -> Report:
        """sync(), and what changed since the previous report."""
        self.sync()
        skipped, overflows = self.nonfinite_total + self.diverged_total, self.overflows
        new = Report(self.last_applied, skipped - self._reported[0], overflows - self._reported[1], self.last_reason,
                     self.last_skipped_step)
        self._reported = (skipped, overflows)
        return new

    def state_dict(self) -> dict[str, Any]:
        self.sync()
        return {"levels": {k: v.__dict__.copy() for k, v in self.levels.items()},
                "skipped_in_a_row": self.skipped_in_a_row, "nonfinite_total": self.nonfinite_total,
                "diverged_total": self.diverged_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.get("levels", {}).items():
            self.levels[k].__dict__.update(v)
        for k in ("skipped_in_a_row", "nonfinite_total", "diverged_total"):
            setattr(self, k, int(state.get(k, 0)))
        self._reported = (self.nonfinite_total + self.diverged_total, self.overflows)
        self._device = None  # the next step starts from the loaded state


def reason(name: str, kind: str, value: float, level: float | None = None, factor: float | None = None) -> str:
    if kind == "non-finite":
        return f"non-finite {name} ({value})"
    return f"{name} {value:.4g} is over {factor:g} x its running level {level:.4g}"


def moved(average, value, momentum: float):
    """The moving average after one more value (floats or tensors alike)."""
    return momentum * average + (1.0 - momentum) * value


def level_value(average, count, momentum: float):
    """The bias-corrected level (Adam's first moment, Kingma & Ba 2015, Alg. 1); floats or tensors alike."""
    return average / (1.0 - momentum ** count)


class _Level:
    """Bias-corrected exponential moving average of the accepted steps' values (on the host)."""

    def __init__(self):
        self.average, self.count = 0.0, 0

    def update(self, value: float, momentum: float) -> None:
        self.average = moved(self.average, float(value), momentum)
        self.count += 1

    def value(self, momentum: float) -> float | None:
        return level_value(self.average, self.count, momentum) if self.count else None
