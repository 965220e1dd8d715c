"""`StageStats`: what each stage of an encoder does to its tokens and gradients while it trains.

Every ``every`` optimizer steps it records, on that step's first micro-batch, split ``stages`` in ``metrics.jsonl``:

- ``rms.<stage>``: the RMS of the stage's output tokens (real tokens only);
- ``spread.<stage>``: across-sample spread, ``std_b(mean_t x) / mean|mean_t x|`` over the batch (mean over
  channels): near 0 when every sample gives the same pooled features (the "collapsed tokens" of a run that does
  not learn), of order 1 when samples differ;
- ``update.llm``: ``||layers(x) - x|| / ||x||`` of the LLM blocks on this batch (before their final norm);
- ``grad.<group>``: the gradient norm of each parameter group, before clipping.

Stages are found by name on the model (``tokenizer``, ``llm_stage.adapter_in`` / ``blocks`` / ``adapter_out``,
the input of ``llm_stage`` and of ``head``), so the library needs no model class; a model without them logs what it
has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .callbacks import Callback

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["StageStats", "token_stats"]

# (label, module path, "in" | "out"): where the activations are read.
_ACTIVATIONS = (
    ("tokens", "tokenizer", "out"),
    ("into_llm", "llm_stage", "in"),
    ("adapter_in", "llm_stage.adapter_in", "out"),
    ("adapter_out", "llm_stage.adapter_out", "out"),
    ("into_head", "head", "in"),
)
_GROUPS = ("tokenizer", "backbone", "llm_stage.adapter_in", "llm_stage.blocks", "llm_stage.adapter_out", "head")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def _tensor_and_mask(value: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if isinstance(value, tuple | list) and value:
        value = value[0]
    x = getattr(value, "x", value)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        return None
    mask = getattr(value, "mask", None)
    return x.detach(), (mask.detach().bool() if isinstance(mask, torch.Tensor) else None)


@torch.no_grad()
def token_stats(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """``(rms, spread)`` of tokens ``x [B, N, D]`` (``mask [B, N]``, True on real tokens); see the module doc."""
    x = x.float()
    keep = mask[..., None].float() if mask is not None else torch.ones_like(x[..., :1])
    count = keep.sum().clamp_min(1)
    rms = float(((x * keep).pow(2).sum() / (count * x.shape[-1])).sqrt())
    pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1)  # [B, D]
    if pooled.shape[0] < 2:
        return rms, float("nan")
    spread = float(pooled.std(0).mean() / pooled.abs().mean().clamp_min(1e-12))
    return rms, spread


class StageStats(Callback):
    """Log per-stage activation RMS, across-sample spread, the LLM blocks' update RMS and per-group gradient norms
    every `every` optimizer steps (``train.instrument_every``); see the module doc."""

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"StageStats every must be >= 1, got {every}")
        self.every = int(every)
        self._handles: list[Any] = []
        self._record: dict[str, float] = {}
        self._layers_in: torch.Tensor | None = None

    def _active(self, step: int) -> bool:
        return step % self.every == 0

    def on_step_start(self, trainer: Trainer) -> None:
        # trainer.step is the index of the step about to run; it is logged as step + 1
        self._remove()
        self._record = {}
        if not self._active(trainer.step + 1):
            return None
        model = _unwrap(trainer.model)
        for label, path, side in _ACTIVATIONS:
            module = _get(model, path)
            if module is not None:
                self._hook(module, label, side)
        layers = getattr(_get(model, "llm_stage.blocks"), "layers", None)
        if layers is not None and len(layers):
            self._handles.append(layers[0].register_forward_pre_hook(self._keep_layers_in, with_kwargs=True))
            self._handles.append(layers[-1].register_forward_hook(self._update, with_kwargs=True))
        return None

    def _hook(self, module: nn.Module, label: str, side: str) -> None:
        def record(value: Any) -> None:
            # the first micro-batch's training forward only (not a no-grad call such as a calibration's)
            if f"rms.{label}" in self._record or not torch.is_grad_enabled():
                return
            got = _tensor_and_mask(value)
            if got is not None:
                rms, spread = token_stats(*got)
                self._record[f"rms.{label}"], self._record[f"spread.{label}"] = rms, spread

        if side == "in":
            self._handles.append(module.register_forward_pre_hook(lambda m, args: record(args)))
        else:
            self._handles.append(module.register_forward_hook(lambda m, args, out: record(out)))

    def _keep_layers_in(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if self._layers_in is None and isinstance(hidden, torch.Tensor) and torch.is_grad_enabled():
            self._layers_in = hidden.detach()

    def _update(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if "update.llm" in self._record or self._layers_in is None:
            return
        y = out[0] if isinstance(out, tuple) else out
        x = self._layers_in.float()
        self._record["update.llm"] = float((y.detach().float() - x).norm() / x.norm().clamp_min(1e-12))

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        self._remove()
        if not self._active(trainer.step + 1):
            return
        model = _unwrap(trainer.model)
        sums: dict[str, float] = {}
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            group = next((g for g in _GROUPS if name.startswith(g + ".")), "other")
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP: a DTensor
            sums[group] = sums.get(group, 0.0) + float(grad.detach().float().pow(2).sum())
        for group, total in sums.items():
            self._record[f"grad.{group}"] = total**0.5

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        self._remove()
        if self._active(step) and self._record:
            trainer.logger.log(step, self._record, split="stages")
        self._record = {}

    def on_fit_end(self, trainer: Trainer, summary: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._layers_in = None


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Module) else None
