"""Metrics to JSON lines and TensorBoard, and a data-time vs step-time throughput timer.

``metrics.jsonl`` holds one JSON object per :meth:`MetricsLogger.log` call::

    {"step": 100, "split": "train", "time": 1718000000.5, "loss": 2.31, "lr": 0.0003, "samples_per_s": 812.4}

Lines are flushed as they are written, so a crashed run keeps every metric logged before the crash, and a resumed
run appends to the same file. Non-finite values are written as the strings "NaN", "Infinity" and "-Infinity" (the
file stays strict JSON); :func:`read_metrics` turns them back into floats.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricsLogger", "StepTimer", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "split", "time")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _scalar(name: str, value: Any) -> float | int:
    """A python number from a float/int/bool, numpy scalar or one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().item()
    elif hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")


def _encode(value: float | int) -> float | int | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


class MetricsLogger:
    """Append metrics to ``out_dir/metrics.jsonl`` and, optionally, TensorBoard (``out_dir/tensorboard``).

    Only ``rank == 0`` writes; on other ranks every method is a cheap no-op and nothing is created on disk.
    TensorBoard tags are ``f"{split}/{name}"`` (e.g. ``train/loss``, ``val/acc``).

    Example::

        with MetricsLogger(run_dir, rank=rank) as log:
            log.log(step, {"loss": loss.item(), "lr": sched.get_last_lr()[0]})
            log.log(step, {"loss": val_loss, "acc": val_acc}, split="val")
    """

    def __init__(self, out_dir: str | os.PathLike, *, tensorboard: bool = True, rank: int = 0):
        self.out_dir = Path(out_dir)
        self.rank = int(rank)
        self.path = self.out_dir / METRICS_FILE
        self._file = None
        self._writer = None
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - tensorboard is a dependency
                warnings.warn(f"TensorBoard logging disabled: {e}", stacklevel=2)
            else:
                self._writer = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR))

    @property
    def enabled(self) -> bool:
        """Whether this logger writes anything (rank 0 and not closed)."""
        return self._file is not None

    @property
    def tensorboard_dir(self) -> Path | None:
        return self.out_dir / TENSORBOARD_DIR if self._writer is not None else None

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Write one record of ``metrics`` (name -> number, a 1-element tensor is fine) at optimizer step ``step``."""
        if self._file is None:
            if self.rank == 0:
                raise RuntimeError(f"MetricsLogger for {self.path} is closed")
            return
        if not isinstance(split, str) or not split or "/" in split:
            raise ValueError(f"split must be a non-empty string without '/', got {split!r}")
        values: dict[str, float | int] = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"metric names must be non-empty strings, got {name!r}")
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved (record fields: {', '.join(_RESERVED)})")
            values[name] = _scalar(name, value)
        now = time.time()
        record = {"step": int(step), "split": split, "time": now} | {k: _encode(v) for k, v in values.items()}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{split}/{name}", value, global_step=int(step), walltime=now)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; prefer close() / `with`
        with contextlib.suppress(Exception):
            self.close()


def read_metrics(path: str | os.PathLike, *, split: str | None = None) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a file, or a folder holding one), in file order.

    Non-finite values written as strings come back as floats. A torn last line (a crash mid-write) is skipped;
    a malformed line elsewhere raises ``ValueError`` naming the file and line. ``split`` keeps only that split.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}:{i + 1}: skipping a truncated last line", stacklevel=2)
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: not a JSON object")
        rec = {k: (_NONFINITE.get(v, v) if isinstance(v, str) and k not in _RESERVED else v) for k, v in rec.items()}
        if split is None or rec.get("split") == split:
            records.append(rec)
    return records


class StepTimer:
    """Data time vs step time and throughput, as open_clip reports ``Data (t)`` vs ``Batch (t)``.

    Call :meth:`data_done` when the batch has arrived and :meth:`step_done` when the optimizer step has finished;
    the time from the previous ``step_done`` (or :meth:`start`) to ``data_done`` is data time, the whole interval
    is step time. On CUDA, ``step_done`` synchronises the device first so step time is the real GPU time.
    The first ``skip_first`` steps (compilation, cudnn autotune, warm caches) are not counted.

    Example::

        timer = StepTimer(device, world_size=world_size)
        for batch in loader:
            timer.data_done()
            loss = train_step(batch)
            timer.step_done(len(batch))
            if step % log_every == 0:
                logger.log(step, {"loss": loss} | timer.summary())
                timer.reset()
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        world_size: int = 1,
        skip_first: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.device = torch.device(device) if device is not None else None
        self.clock = clock
        self.world_size = int(world_size)
        self.skip_first = int(skip_first)
        self._steps_seen = 0
        self._t_last: float | None = None
        self._t_data: float | None = None
        self._last_data_time = 0.0
        self._last_step_time = 0.0
        self.reset()

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        """Clear the accumulated totals (call after logging a window)."""
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.data_time = 0.0
        self.step_time = 0.0

    def start(self) -> None:
        """Mark the start of the wait for the next batch (done implicitly by the first ``data_done``)."""
        self._sync()
        self._t_last = self.clock()
        self._t_data = None

    def data_done(self) -> None:
        now = self.clock()
        if self._t_last is None:
            self._t_last = now
        self._t_data = now

    def step_done(self, samples: int = 0, tokens: int = 0) -> None:
        """End a step of ``samples`` samples (``tokens`` tokens) on this process."""
        self._sync()
        now = self.clock()
        if self._t_last is None:
            self._t_last = now
        t_data = self._t_data if self._t_data is not None else self._t_last
        self._steps_seen += 1
        self._last_data_time = t_data - self._t_last
        self._last_step_time = now - self._t_last
        if self._steps_seen > self.skip_first:
            self.steps += 1
            self.samples += int(samples)
            self.tokens += int(tokens)
            self.data_time += self._last_data_time
            self.step_time += self._last_step_time
        self._t_last = now
        self._t_data = None

    def summary(self) -> dict[str, float]:
        """Means over the counted steps since the last reset.

        Keys: ``data_time`` and ``step_time`` (s per step; step time includes data time), ``data_frac``,
        ``samples_per_s`` (all processes, = per-GPU x world_size), ``samples_per_s_per_gpu``, ``tokens_per_s`` and
        ``tokens_per_s_per_gpu`` (when tokens were counted), and ``peak_mem_gib`` on CUDA.
        Empty if no step was counted yet.
        """
        if self.steps == 0 or self.step_time <= 0:
            return {}
        out = {
            "data_time": self.data_time / self.steps,
            "step_time": self.step_time / self.steps,
            "data_frac": self.data_time / self.step_time,
            "samples_per_s_per_gpu": self.samples / self.step_time,
            "samples_per_s": self.samples / self.step_time * self.world_size,
        }
        if self.tokens:
            out["tokens_per_s_per_gpu"] = self.tokens / self.step_time
            out["tokens_per_s"] = self.tokens / self.step_time * self.world_size
        if self.device is not None and self.device.type == "cuda" and torch.cuda.is_available():
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    @property
    def last(self) -> dict[str, float]:
        """Data and step time of the most recent step (counted or not), for progress bars."""
        return {"data_time": self._last_data_time, "step_time": self._last_step_time}
