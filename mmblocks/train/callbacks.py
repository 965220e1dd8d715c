"""Trainer callbacks: code that runs at fixed points of `Trainer.fit` without the loop knowing what it does.

A callback overrides any of the hooks below. ``on_step_start`` runs before the forward passes of every optimizer
step and may return metrics to log with that step; a plain function ``fn(trainer, step)`` is an ``on_step_end``
callback. Every trainer runs `default_callbacks` first (`SoftMaskCallback`, `CalibrationCallback`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from ..layers.soft_mask import advance_soft_masks, soft_mask_modules

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["CalibrationCallback", "Callback", "FunctionCallback", "SoftMaskCallback", "default_callbacks"]


class Callback:
    """Base class: every hook does nothing."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After resuming, before the first step."""

    def on_step_start(self, trainer: Trainer) -> Mapping[str, float] | None:
        """Before the forward passes of optimizer step ``trainer.step``; the values returned are logged with it."""
        return None

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """After the backward passes of step ``trainer.step``, before gradient clipping and the optimizer step."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After optimizer step `step` (``trainer.step == step``), its logging and checkpoint."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, val: Mapping[str, float] | None) -> None:
        """After epoch `epoch` and its evaluation (`val`: the validation metrics, None when not evaluated)."""

    def on_fit_end(self, trainer: Trainer, summary: Mapping[str, Any]) -> None:
        """After the final checkpoint, test evaluation and report."""


class FunctionCallback(Callback):
    """``fn(trainer, step)`` after every optimizer step."""

    def __init__(self, fn: Callable[[Trainer, int], None]):
        self.fn = fn

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        self.fn(trainer, step)


class SoftMaskCallback(Callback):
    """Set iLLaMA's soft-mask ratio ``r`` of every soft-masked module (a causal ViT or `LLMBlocks` with
    ``attention="soft"``) from its schedule before each optimizer step, and log it as ``soft_mask_r``.

    The modules are found once, at the start of training. The ratio is a persistent buffer, so checkpoints keep it
    and a resumed run continues the schedule exactly."""

    def __init__(self) -> None:
        self.modules: list[tuple[str, nn.Module]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.modules = soft_mask_modules(trainer.model)

    def on_step_start(self, trainer: Trainer) -> Mapping[str, float] | None:
        if not self.modules:
            return None
        ratios = advance_soft_masks(self.modules, trainer.step, trainer.epoch, trainer.steps_per_epoch)
        return {"soft_mask_r": next(iter(ratios.values()))}


class CalibrationCallback(Callback):
    """On a fresh run (step 0, not a resume), let every module that asks (``needs_calibration``, ``calibrate``:
    `mmblocks.models.LLMStage` with ``adapter_in_rms``) calibrate itself on its input in the first training forward,
    before that forward runs. A resumed run has its calibrated weights in the checkpoint and is left alone."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.step != 0:
            return
        for module in trainer.model.modules():
            if getattr(module, "needs_calibration", False) and callable(getattr(module, "calibrate", None)):
                if getattr(trainer, "fsdp", False):
                    raise ValueError(
                        f"{type(module).__name__} asks to calibrate its weights on the first batch, which is not "
                        "supported under train.fsdp; calibrate in a single-process run and start from its checkpoint"
                    )
                self.handles.append(module.register_forward_pre_hook(self._once))

    def _once(self, module: nn.Module, args: tuple) -> None:
        if not module.training:
            return
        module.calibrate(args[0])
        for handle in self.handles:  # one module per encoder; all calibrate on their first training forward
            if handle.id in module._forward_pre_hooks:
                handle.remove()

    def on_fit_end(self, trainer: Trainer, summary: Mapping[str, Any]) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def default_callbacks() -> list[Callback]:
    """The callbacks every `Trainer` runs before the ones it is given."""
    return [SoftMaskCallback(), CalibrationCallback()]
