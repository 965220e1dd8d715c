"""Learning-rate schedules and weight-decay parameter groups.

``build_scheduler`` returns a plain ``LambdaLR`` whose multiplier is a small callable object holding only numbers
and a string, so ``scheduler.state_dict()`` stays loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "NO_DECAY_NAME_PATTERNS",
    "SCHEDULES",
    "Schedule",
    "WarmupDecay",
    "build_scheduler",
    "param_groups",
]

Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)

#: Parameters whose (lower-cased) name contains one of these get no weight decay.
NO_DECAY_NAME_PATTERNS = ("pos_embed", "cls_token", "reg_token", "register", "position")

_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
)


class WarmupDecay:
    """LR multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then decay to ``min_lr_ratio``.

    ``step`` is the number of optimizer steps taken (``LambdaLR.last_epoch``): the multiplier is ``0`` at step 0,
    ``1`` at ``step == warmup_steps`` and ``min_lr_ratio`` from ``step == total_steps`` on ("cosine", "linear").
    "constant" stays at ``1`` after the warm-up.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0, schedule: str = "cosine"):
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.schedule = str(schedule)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # linear
            decay = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay

    def __repr__(self) -> str:
        return (
            f"WarmupDecay(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
            f"min_lr_ratio={self.min_lr_ratio}, schedule={self.schedule!r})"
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    schedule: str = "cosine",
) -> LambdaLR:
    """A ``LambdaLR`` over every param group: linear warm-up from 0, then cosine/linear decay or constant.

    The peak LR of each group is the ``lr`` it had when the scheduler was built; the floor is
    ``min_lr_ratio * peak``. Call ``scheduler.step()`` once after each ``optimizer.step()``.

    Args:
        total_steps: optimizer steps of the whole run (``>= 1``).
        warmup_steps: steps of linear warm-up, ``0 <= warmup_steps <= total_steps``.
        min_lr_ratio: final LR as a fraction of the peak, in ``[0, 1]`` (ignored by "constant").
        schedule: "cosine", "linear" or "constant".
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}")
    if not 0.0 <= float(min_lr_ratio) <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    return LambdaLR(optimizer, WarmupDecay(total_steps, warmup_steps, min_lr_ratio, schedule))


def _is_no_decay(name: str, param: torch.Tensor, norm_param_ids: set[int], extra_patterns: Sequence[str]) -> bool:
    if param.ndim <= 1 or id(param) in norm_param_ids:
        return True
    lname = name.lower()
    if lname == "bias" or lname.endswith(".bias"):
        return True
    return any(p in lname for p in (*NO_DECAY_NAME_PATTERNS, *extra_patterns))


def param_groups(
    model_or_named_params: nn.Module | Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    *,
    no_decay_patterns: Sequence[str] = (),
    lr: float | None = None,
    lr_scale: Mapping[str, float] | None = None,
) -> list[dict]:
    """Split the trainable parameters into a weight-decay group and a no-decay group for an optimizer.

    No decay for: biases, every 1-D parameter, parameters of normalisation modules (``nn.LayerNorm``,
    ``nn.RMSNorm``, BatchNorm/GroupNorm/InstanceNorm and any module whose class name contains "Norm", such as
    HF ``LlamaRMSNorm``; needs a module, not named parameters), and names containing pos_embed, cls_token,
    reg_token, register, position or one of ``no_decay_patterns`` (case-insensitive). Frozen parameters
    (``requires_grad=False``) are left out, and a parameter reached under two names (tied weights) appears once.

    Returns:
        ``[{"params": [...], "param_names": [...], "weight_decay": weight_decay},
        {"params": [...], "param_names": [...], "weight_decay": 0.0}]``, empty groups dropped. ``param_names``
        is understood by ``torch.optim`` (stored in its state dict), so names travel with checkpoints.

    Raises:
        ValueError: there is no trainable parameter, or ``weight_decay < 0``.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    norm_param_ids: set[int] = set()
    if isinstance(model_or_named_params, nn.Module):
        for module in model_or_named_params.modules():
            if isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__:
                norm_param_ids.update(id(p) for p in module.parameters(recurse=False))
        named = list(model_or_named_params.named_parameters())
    else:
        named = list(model_or_named_params)

    lower_patterns = tuple(p.lower() for p in no_decay_patterns)
    decay: tuple[list, list] = ([], [])
    no_decay: tuple[list, list] = ([], [])
    seen: set[int] = set()
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"expected (name, parameter) pairs, got {type(item).__name__}")
        name, param = item
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        target = no_decay if _is_no_decay(name, param, norm_param_ids, lower_patterns) else decay
        target[0].append(param)
        target[1].append(name)

    groups = []
    if decay[0]:
        groups.append({"params": decay[0], "param_names": decay[1], "weight_decay": float(weight_decay)})
    if no_decay[0]:
        groups.append({"params": no_decay[0], "param_names": no_decay[1], "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters (all have requires_grad=False)")
    if lr_scale:
        groups = _scale_groups(groups, lr, lr_scale, [n for n, _ in named])
    return groups


def _scale_groups(
    groups: list[dict], lr: float | None, lr_scale: Mapping[str, float], all_names: Sequence[str]
) -> list[dict]:
    """Split each group by the longest `lr_scale` prefix its parameters' names match; a matched group gets
    ``lr * factor``. A prefix that matches no trainable parameter is an error (a typo would silently do nothing),
    unless the model has no part of that name at all (``llm_stage`` in the baseline arm of a study)."""
    if lr is None:
        raise ValueError("param_groups: lr_scale needs the base lr")
    prefixes = sorted(lr_scale, key=len, reverse=True)
    used: set[str] = set()
    out = []
    for group in groups:
        split: dict[str | None, tuple[list, list]] = {}
        for p, name in zip(group["params"], group["param_names"]):
            hit = next((q for q in prefixes if name == q or name.startswith(q + ".")), None)
            split.setdefault(hit, ([], []))
            split[hit][0].append(p)
            split[hit][1].append(name)
        for hit, (params, names) in split.items():
            new = {**group, "params": params, "param_names": names}
            if hit is not None:
                used.add(hit)
                new["lr"] = float(lr) * float(lr_scale[hit])
            out.append(new)
    roots = {n.split(".", 1)[0] for n in all_names}
    unused = sorted(q for q in set(lr_scale) - used if q.split(".", 1)[0] in roots)
    if unused:
        raise ValueError(
            f"lr_scale: prefix(es) {unused} match no trainable parameter (names look like 'llm_stage."
            "adapter_in.proj.weight', 'backbone.blocks.0.attn.qkv.weight')"
        )
    return out
