"""`TrainSettings`: every knob of the `Trainer`, with its default, type and meaning — the one place they are written.

The ``train:`` section of a config is this dataclass (`mmblocks.config` derives its schema from the fields: defaults,
types, the choices of ``Literal`` fields and the docs), and ``Trainer(..., lr=3e-4)`` takes the same names.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, get_args

from .schedule import Schedule

__all__ = ["AMP_MODES", "DEVICES", "AmpMode", "Device", "TrainSettings"]

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
AmpMode = Literal["auto", "bf16", "fp16", "none"]
AMP_MODES: tuple[str, ...] = get_args(AmpMode)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass
class TrainSettings:
    """How the `Trainer` trains (the ``train:`` section of a config)."""

    out_dir: str | None = field(
        default=None, metadata=_doc("run folder: checkpoints, metrics, report (a config's default: runs/<name>)")
    )
    epochs: int = field(default=10, metadata=_doc("epochs to train (unless max_steps ends the run first)"))
    max_steps: int | None = field(default=None, metadata=_doc("stop after this many optimizer steps"))
    steps_per_epoch: int | None = field(
        default=None, metadata=_doc("optimizer steps per epoch (default: what the loader yields)")
    )
    lr: float = field(default=1e-3, metadata=_doc("peak learning rate (AdamW)"))
    min_lr_ratio: float = field(default=0.01, metadata=_doc("final learning rate as a fraction of lr"))
    weight_decay: float = field(
        default=0.05, metadata=_doc("AdamW weight decay (none on norms, biases, position and special tokens)")
    )
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_doc("AdamW betas"))
    lr_scale: dict[str, float] = field(
        default_factory=dict,
        metadata=_doc(
            "per-stage learning rates: parameter-name prefix -> factor on lr (the longest matching prefix wins), "
            "e.g. {llm_stage: 0.3} or {llm_stage.adapter_in: 0.1}; warm-up and decay apply to every group alike"
        ),
    )
    warmup_steps: int | None = field(default=None, metadata=_doc("linear warm-up steps (default: warmup_epochs)"))
    warmup_epochs: float = field(default=1.0, metadata=_doc("linear warm-up in epochs when warmup_steps is not set"))
    schedule: Schedule = field(default="cosine", metadata=_doc("decay after warm-up"))
    grad_clip: float | None = field(default=1.0, metadata=_doc("clip the gradient norm to this (null: no clipping)"))
    accum_steps: int = field(default=1, metadata=_doc("micro-batches per optimizer step"))
    seed: int = field(
        default=0,
        metadata=_doc("seeds python, numpy and torch before the model is built, and the loaders (mmblocks.recipes)"),
    )
    device: Device = field(default="auto", metadata=_doc("auto: CUDA when available"))
    amp: AmpMode = field(default="auto", metadata=_doc("autocast dtype (auto: bf16 on CUDA, none on CPU)"))
    compile: bool = field(default=False, metadata=_doc("torch.compile the model"))
    grad_checkpointing: bool = field(default=False, metadata=_doc("recompute blocks in backward to save memory"))
    fsdp: bool = field(
        default=False,
        metadata=_doc(
            "under torchrun: shard the model with FSDP2 (each LM / LLM-block layer a unit) instead of DDP (CUDA or CPU)"
        ),
    )
    checkpoint_every: int = field(default=500, metadata=_doc("optimizer steps between checkpoints"))
    keep_checkpoints: int = field(default=3, metadata=_doc("checkpoints kept (older ones are deleted)"))
    log_every: int = field(default=20, metadata=_doc("optimizer steps between metric records"))
    eval_every: int = field(default=1, metadata=_doc("epochs between evaluations"))
    instrument_every: int = field(
        default=0,
        metadata=_doc(
            "optimizer steps between per-stage records (activation RMS, across-sample spread, the LLM blocks' update "
            "RMS, gradient norm per stage: split `stages` of metrics.jsonl); 0: off"
        ),
    )
    tensorboard: bool = field(default=True, metadata=_doc("also write TensorBoard events"))
    progress: bool = field(default=True, metadata=_doc("tqdm progress bars"))

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name}: {value!r} is not one of {list(choices)}")
        for name in ("epochs", "accum_steps", "checkpoint_every", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        for prefix, factor in self.lr_scale.items():
            if (
                not isinstance(prefix, str)
                or not prefix
                or isinstance(factor, bool)
                or not isinstance(factor, int | float)
            ):
                raise ValueError(f"lr_scale: expected parameter-name prefix -> number, got {prefix!r}: {factor!r}")
            if not factor > 0:
                raise ValueError(f"lr_scale[{prefix!r}]: must be > 0, got {factor}")
        if len(self.betas) != 2:
            raise ValueError(f"betas: expected two numbers, got {self.betas}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
