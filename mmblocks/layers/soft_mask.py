"""iLLaMA's soft mask: a schedule for the attention mix ratio ``r`` and the hook that applies it every step.

Attention under a soft mask mixes bidirectional and causal attention with a ratio ``r``: ``r = 1`` is
bidirectional, ``r = 0`` is causal (see `mmblocks.layers.masks.soft_mask_weights`). iLLaMA
(`techmonsterwang/iLLaMA`, `mask_scheduler.py`) starts training at ``r = r_start`` (1.0 by default) and phases
the causal mask in over the first ``cutoff`` epochs:

* ``linear``: ``r`` goes linearly from ``r_start`` to ``r_end`` (0) over the cutoff, then stays at ``r_end``;
* ``constant``: ``r`` stays at ``r_start`` until the cutoff, then drops to ``r_end``.

The iLLaMA recipes use ``constant``, cutoff 50 epochs (tiny) and ``linear``, cutoff 50 (small) / 25 (base).

Modules that hold a schedule (`CausalViT` with ``attention="soft"``, `LLMBlocks` with ``attention="soft"``)
expose it as ``module.soft_mask`` and take the current ratio through ``module.set_soft_mask_ratio(r)``;
`advance_soft_masks` sets them all and must run before the forward passes of every optimizer step (in training,
`mmblocks.train.SoftMaskCallback` calls it). The current ratio lives in a persistent buffer of those modules, so
checkpoints that keep buffers restore it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["SOFT_MASK_MODES", "SOFT_MASK_UNITS", "SoftMaskSchedule", "advance_soft_masks", "soft_mask_modules"]

SOFT_MASK_MODES: tuple[str, ...] = ("linear", "constant")
SOFT_MASK_UNITS: tuple[str, ...] = ("epochs", "steps")


class SoftMaskSchedule:
    """The mix ratio ``r`` as a function of the training position (iLLaMA's soft mask).

    Args:
        mode: ``linear`` (``r_start -> r_end`` over the cutoff) or ``constant`` (``r_start`` until the cutoff).
        cutoff: length of the soft phase, in `unit`; ``None`` = never ends (``r_start`` for ever with ``constant``).
            ``0`` = no soft phase (``r_end`` from the first step).
        unit: ``epochs`` (the iLLaMA recipes; needs ``steps_per_epoch`` or a fractional ``epoch``) or ``steps``
            (optimizer steps).
        r_start: ratio at step 0 (1.0 = bidirectional).
        r_end: ratio after the cutoff (0.0 = causal).

    ``value(step, epoch, steps_per_epoch)`` is a pure function of its arguments, so a resumed run that passes the
    restored step gets the same ``r`` as the uninterrupted one; `state_dict` / `load_state_dict` round-trip the
    settings and the last value.
    """

    def __init__(
        self,
        mode: str = "linear",
        cutoff: float | None = 50,
        unit: str = "epochs",
        r_start: float = 1.0,
        r_end: float = 0.0,
    ):
        if mode not in SOFT_MASK_MODES:
            raise ValueError(f"soft mask mode must be one of {SOFT_MASK_MODES}, got {mode!r}")
        if unit not in SOFT_MASK_UNITS:
            raise ValueError(f"soft mask unit must be one of {SOFT_MASK_UNITS}, got {unit!r}")
        if cutoff is not None and (not math.isfinite(float(cutoff)) or cutoff < 0):
            raise ValueError(f"soft mask cutoff must be >= 0 (or None for no cutoff), got {cutoff!r}")
        for name, r in (("r_start", r_start), ("r_end", r_end)):
            if not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"soft mask {name} must lie in [0, 1] (1 = bidirectional, 0 = causal), got {r!r}")
        self.mode = mode
        self.cutoff = None if cutoff is None else float(cutoff)
        self.unit = unit
        self.r_start = float(r_start)
        self.r_end = float(r_end)
        self.last_step: int | None = None
        self.last_value: float | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, spec: SoftMaskSchedule | Mapping[str, Any] | float | None) -> SoftMaskSchedule | None:
        """A schedule from a schedule, a config mapping (the constructor's keywords), a number (a fixed ratio for
        the whole run) or None (None)."""
        if spec is None or isinstance(spec, SoftMaskSchedule):
            return spec
        if isinstance(spec, bool):
            raise TypeError(f"a soft mask schedule cannot be a bool, got {spec!r}")
        if isinstance(spec, (int, float)):
            return cls(mode="constant", cutoff=None, r_start=float(spec), r_end=float(spec))
        if isinstance(spec, Mapping):
            known = {"mode", "cutoff", "unit", "r_start", "r_end"}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"unknown soft mask schedule keys {unknown}; expected some of {sorted(known)}")
            return cls(**spec)
        raise TypeError(f"a soft mask schedule must be a SoftMaskSchedule, a mapping or a number, got {spec!r}")

    # ------------------------------------------------------------------ the schedule
    def progress(self, step: int, epoch: float | None = None, steps_per_epoch: int | None = None) -> float:
        """How far into the soft phase ``step`` is: 0 at the start, >= 1 at and past the cutoff (always 0 when
        there is no cutoff)."""
        if self.cutoff is None:
            return 0.0
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.unit == "steps":
            position = float(step)
        elif steps_per_epoch is not None:
            if steps_per_epoch <= 0:
                raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
            position = step / steps_per_epoch
        elif epoch is not None:
            position = float(epoch)
        else:
            raise ValueError("a soft mask cutoff in epochs needs steps_per_epoch (or a fractional epoch)")
        if self.cutoff == 0:
            return math.inf
        return position / self.cutoff

    def value(self, step: int, epoch: float | None = None, steps_per_epoch: int | None = None) -> float:
        """``r`` for optimizer step ``step`` (0-based; epochs count ``step / steps_per_epoch`` when given, else
        the ``epoch`` passed, which may be fractional)."""
        t = self.progress(step, epoch, steps_per_epoch)
        if t >= 1.0:
            r = self.r_end
        elif self.mode == "constant":
            r = self.r_start
        else:
            r = self.r_start + (self.r_end - self.r_start) * t
        self.last_step, self.last_value = int(step), float(r)
        return float(r)

    __call__ = value

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "cutoff": self.cutoff,
            "unit": self.unit,
            "r_start": self.r_start,
            "r_end": self.r_end,
            "last_step": self.last_step,
            "last_value": self.last_value,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fresh = SoftMaskSchedule(
            mode=state["mode"],
            cutoff=state["cutoff"],
            unit=state["unit"],
            r_start=state["r_start"],
            r_end=state["r_end"],
        )
        self.__dict__.update(fresh.__dict__)
        self.last_step = state.get("last_step")
        self.last_value = state.get("last_value")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SoftMaskSchedule):
            return NotImplemented
        keys = ("mode", "cutoff", "unit", "r_start", "r_end")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def __repr__(self) -> str:
        return (
            f"SoftMaskSchedule(mode={self.mode!r}, cutoff={self.cutoff}, unit={self.unit!r}, "
            f"r_start={self.r_start}, r_end={self.r_end})"
        )


def soft_mask_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module below `model` holding a schedule (``soft_mask``) and taking a ratio
    (``set_soft_mask_ratio``)."""
    out = []
    for name, module in model.named_modules():
        schedule = getattr(module, "soft_mask", None)
        if schedule is not None and hasattr(schedule, "value") and hasattr(module, "set_soft_mask_ratio"):
            out.append((name, module))
    return out


def advance_soft_masks(
    model: nn.Module | Sequence[tuple[str, nn.Module]],
    step: int,
    epoch: float | None = None,
    steps_per_epoch: int | None = None,
) -> dict[str, float]:
    """Set every soft-masked module below `model` (or the ``(name, module)`` pairs `soft_mask_modules` found once) to
    its schedule's ratio at ``step``; returns ``{module name: r}`` (empty when nothing is soft-masked). Call before
    the forward passes of each optimizer step (`mmblocks.train.SoftMaskCallback` does, in the trainer)."""
    out: dict[str, float] = {}
    for name, module in soft_mask_modules(model) if isinstance(model, nn.Module) else model:
        r = module.soft_mask.value(step, epoch, steps_per_epoch)
        module.set_soft_mask_ratio(r)
        out[name or type(module).__name__] = r
    return out
