"""`Task`: what is learned from a batch — the shard fields it needs, the head it trains, its loss and its metrics.

The `mmblocks.train.Trainer` knows nothing of labels, logits or captions: every step it asks the task for the loss
of a batch (`Task.training_step`), and for evaluation it lets the task accumulate its metrics (`Task.new_metrics`,
`Task.evaluate_step`), sums them over ranks (`Metrics.sync`) and reads them out (`Metrics.compute`). A new kind of
training (contrastive, prefix-LM, CTC, reconstruction) is one `Task` subclass in a file of its own, registered with
``@register_task("name")``.

The model a task drives is an `mmblocks.models.MMEncoder` (or anything callable the same way): called as
``model(inputs, mask=..., return_aux=True, **extra)`` it returns ``(output, aux_loss)``, the auxiliary loss the model
reports (Control LLM's divergence; 0 otherwise) passed explicitly to the task's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ..heads import create_head

__all__ = ["Metrics", "StepOutput", "Task", "all_gather_rows", "all_reduce_sum_"]


@dataclass
class StepOutput:
    """One training micro-batch: the ``loss`` to backpropagate (the task's loss plus the model's auxiliary loss),
    detached per-batch ``metrics`` for the training log (0-d tensors: reading them is deferred to log time, so a step
    costs no host sync) and the ``num_samples`` it covered."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum `tensors` over ranks in place (nothing when torch.distributed is not running with several ranks)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_rows(rows: list[Any]) -> list[Any]:
    """Every rank's `rows` (JSON-like per-sample records: predictions next to references), concatenated in rank
    order; `rows` itself when torch.distributed is not running with several ranks."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


class Metrics:
    """An evaluation accumulator: `update` per batch (on the device, no host sync), `sync` once across ranks,
    `compute` the numbers, `report` the task's own figures (e.g. a confusion matrix) into a report folder."""

    def update(self, output: Any, batch: Any) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Reduce the state across ranks (call on every rank, once, before `compute`)."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def report(self, out_dir: Path, split: str) -> list[tuple[str, str]]:
        """Write the task's figures for `split` into `out_dir`; returns ``(title, markdown)`` report sections."""
        return []


class Task:
    """Base class of the tasks (see the module docstring).

    Class attributes:
        fields: the shard fields (``cls``, ``txt``, ``json``) every sample must carry; the loader is built with them,
            so a sample without one is an error that names it and its shard.
        default_head: the head registry name `build_head` uses when the config names none.
        monitor: ``(metric, "max" | "min")``, the validation metric that decides the best step.
    """

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    default_head: ClassVar[str] = ""
    monitor: ClassVar[tuple[str, str]] = ("loss", "min")

    def build_head(self, in_dim: int, name: str | None = None, **kwargs: Any) -> nn.Module:
        """The head this task trains, on tokens of width `in_dim` (`mmblocks.heads.create_head`)."""
        return create_head(name or self.default_head, in_dim, **kwargs)

    def model_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the model call for `batch` (the loader's `Batch.model_inputs` by default)."""
        return batch.model_inputs()

    def forward(self, model: Callable[..., Any], batch: Any) -> tuple[Any, torch.Tensor | float]:
        """Run `model` on `batch`: ``(output, aux_loss)``."""
        args, kwargs = self.model_inputs(batch)
        return model(*args, return_aux=True, **kwargs)

    def training_step(self, model: Callable[..., Any], batch: Any) -> StepOutput:
        raise NotImplementedError

    def new_metrics(self, device: torch.device) -> Metrics:
        raise NotImplementedError

    def evaluate_step(self, model: Callable[..., Any], batch: Any, metrics: Metrics) -> None:
        """Accumulate the metrics of one evaluation batch (the trainer runs it under ``torch.no_grad``)."""
        args, kwargs = self.model_inputs(batch)
        metrics.update(model(*args, **kwargs), batch)

    def checkpoint_state(self) -> dict[str, Any]:
        """JSON facts of the task saved in every checkpoint (``extra["task"]``) that inference must reproduce (a
        prefix-LM's prompt format); empty by default."""
        return {}

    def check_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint whose `checkpoint_state` this task cannot reproduce (nothing to check by default)."""

    def chance(self) -> dict[str, float] | None:
        """What a model that ignores its input scores: ``{metric: value}`` (the training loss included), or None
        where the task has no such level. Written into the run's summary so that a study can tell a run that left
        chance from one that did not."""
        return None

    def better(self, value: float, best: float | None) -> bool:
        """Whether `value` of the monitored metric improves on `best` (ties count as better: the later step wins)."""
        if best is None:
            return True
        return value >= best if self.monitor[1] == "max" else value <= best

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
