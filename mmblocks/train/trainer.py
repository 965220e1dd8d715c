"""`Trainer`: train a built model on a `Task` from built loaders; checkpoint, evaluate and report.

The trainer receives objects and never reads a config: the model (an `mmblocks.models.MMEncoder` or any module the
task can drive), the `mmblocks.tasks.Task` (which batch fields it needs, the loss and the metrics), the loaders
(`mmblocks.data.build_loader`) and its settings (`TrainSettings`, or their names as keyword arguments). The
config-driven entry point, ``mmblocks train CONFIG``, is `mmblocks.recipes`, which builds these objects and calls it.

Single process or `torchrun` (DDP). AdamW over the trainable parameters only (no decay on norms, biases and
position/cls tokens), warmup + cosine, clipping, accumulation, bf16 autocast on GPU, optional `torch.compile`,
atomic checkpoints every N steps with exact resume, JSONL + TensorBoard metrics, callbacks (`mmblocks.train.callbacks`;
iLLaMA's soft-mask schedule is one), and a final report folder with the task's own figures.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError
from ..tasks.base import Metrics, Task
from .callbacks import Callback, FunctionCallback, default_callbacks
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    trainable_state_dict,
)
from .distributed import DistInfo, all_reduce_min, barrier, init_distributed
from .logging import MetricsLogger, StepTimer
from .report import REPORT_DIR, write_report
from .schedule import build_scheduler, param_groups
from .settings import TrainSettings

__all__ = ["Trainer", "amp_dtype", "evaluate", "seed_everything"]

StepCallback = Callable[["Trainer", int], None]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (a run's model init and augmentation then repeat exactly)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on `device` (None: no autocast; ``auto`` is bf16 on CUDA only)."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    loader: Any,
    *,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[str, float], Metrics]:
    """Evaluate `model` on every sample of `loader` (each counted exactly once across ranks): ``(results, metrics)``,
    the task's numbers plus ``skipped`` (corrupt samples) and the reduced `Metrics` (for the task's report)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    metrics = task.new_metrics(device)
    try:
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            with _autocast(device, autocast_dtype):
                task.evaluate_step(model, batch, metrics)
    finally:
        model.train(was_training)
    metrics.sync()
    results = metrics.compute()
    stats = loader.global_stats() if hasattr(loader, "global_stats") else {}
    if not results.get("samples"):
        raise DataError(f"{loader!r} yielded no samples to evaluate")
    return {**results, "skipped": float(stats.get("skipped", 0))}, metrics


class Trainer:
    """Train `model` on `task` with the batches of `train_loader`.

    Args:
        model: the model the task drives (moved to the run's device here).
        task: what is learned (`mmblocks.tasks.create_task`); its head is already part of `model`.
        train_loader: yields batches with ``.to(device)``; ``set_epoch(epoch)`` reseeds it (exact resume needs it),
            ``len()`` is its batches per epoch, ``global_stats()`` its corrupt-sample counts (`build_loader` has all).
        val_loader, test_loader: evaluated after epochs / at the end (None: skipped).
        settings: a `TrainSettings`; `overrides` (its field names, e.g. ``lr=3e-4, out_dir="runs/x"``) replace
            fields. ``out_dir`` is required.
        callbacks: `Callback` objects or functions ``fn(trainer, step)`` called after every optimizer step
            (rank-local), run after `default_callbacks`.
        resume: continue from the latest checkpoint in ``out_dir/checkpoints`` (when there is one).
        dist: the process group (default: `init_distributed` for ``settings.device``).
        run_info: entries for the summary and report (``name``, the components used, ...).
        files: text files written into ``out_dir`` when training starts (e.g. ``{"config.yaml": ...}``).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_loader: Any,
        *,
        val_loader: Any = None,
        test_loader: Any = None,
        settings: TrainSettings | None = None,
        callbacks: Sequence[Callback | StepCallback] = (),
        resume: bool = False,
        dist: DistInfo | None = None,
        run_info: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
        **overrides: Any,
    ):
        unknown = sorted(set(overrides) - set(TrainSettings.names()))
        if unknown:
            raise TypeError(f"Trainer got unknown settings {unknown}; TrainSettings has {list(TrainSettings.names())}")
        self.settings = s = replace(settings or TrainSettings(), **overrides)
        if s.out_dir is None:
            raise ValueError("Trainer needs out_dir (where checkpoints, metrics and the report go)")
        self.task = task
        self.resume = resume
        self.run_info = dict(run_info or {})
        self.files = dict(files or {})
        self.callbacks: list[Callback] = default_callbacks() + [
            cb if isinstance(cb, Callback) else FunctionCallback(cb) for cb in callbacks
        ]
        self.out_dir = Path(s.out_dir)
        self.dist = dist if dist is not None else init_distributed(s.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        if s.grad_checkpointing:
            enable = getattr(self.model, "set_grad_checkpointing", None)
            if enable is None:
                raise ValueError(f"grad_checkpointing needs a model with set_grad_checkpointing(), not {type(model)}")
            enable(True)
        self.amp_dtype = amp_dtype(s.amp, self.device)
        self.train_loader = train_loader
        self.eval_loaders = {k: v for k, v in (("val", val_loader), ("test", test_loader)) if v is not None}
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = s.max_steps or self.steps_per_epoch * s.epochs
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, s.weight_decay),
            lr=s.lr,
            betas=tuple(s.betas),
            fused=self.device.type == "cuda",
        )
        warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(
            self.optimizer,
            total_steps=self.total_steps,
            warmup_steps=min(warmup, self.total_steps),
            min_lr_ratio=s.min_lr_ratio,
            schedule=s.schedule,
        )
        self.ddp_model: nn.Module = self.model
        if s.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        if self.dist.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.ddp_model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, float] = {}
        self.skipped_total = 0
        self.logger: MetricsLogger | None = None
        self.last_metrics: dict[str, Metrics] = {}

    @property
    def name(self) -> str:
        return str(self.run_info.get("name") or self.out_dir.name)

    def _steps_per_epoch(self) -> int:
        s = self.settings
        if s.steps_per_epoch:
            return s.steps_per_epoch
        try:  # the loader knows how many batches this rank yields (each worker's last one may be short)
            batches = len(self.train_loader)
        except TypeError:  # resampled without a nominal epoch size
            batches = math.ceil(self.train_loader.num_samples / self.dist.world_size / self.train_loader.batch_size)
        return max(1, batches // s.accum_steps)

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self) -> Path | None:
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.ckpt_dir,
                self.step,
                model_state=trainable_state_dict(self.model),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                data_state={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
                extra={"best": self.best, "config_name": self.name, "skipped_total": self.skipped_total},
                keep=self.settings.keep_checkpoints,
            )
        barrier()
        return path

    def load(self, path: Path) -> None:
        """Resume from the checkpoint at `path`: the weights (which must fit this model exactly), then the optimizer,
        scheduler, RNG and data position."""
        state = load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, map_location=self.device
        )
        self.step = state["step"]
        self.epoch = state["data_state"]["epoch"]
        self.batch_in_epoch = state["data_state"]["batch_in_epoch"]
        self.best = dict(state["extra"].get("best", {}))
        self.skipped_total = int(state["extra"].get("skipped_total", 0))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str) -> dict[str, float]:
        """The task's metrics on the ``val`` or ``test`` loader, every sample counted exactly once across ranks."""
        if split not in self.eval_loaders:
            raise ValueError(f"this trainer has no {split!r} loader (it has {sorted(self.eval_loaders)})")
        results, metrics = evaluate(
            self.model, self.task, self.eval_loaders[split], device=self.device, autocast_dtype=self.amp_dtype
        )
        self.last_metrics[split] = metrics
        return results

    # ------------------------------------------------------------------ training
    def _batches(self) -> Iterator[Any]:
        self.train_loader.set_epoch(self.epoch)
        it = iter(self.train_loader)
        for _ in range(self.batch_in_epoch):  # resume mid-epoch: the order is a function of (seed, epoch)
            next(it, None)
        yield from it

    def _micro_step(self, batch: Any, sync: bool) -> tuple[dict[str, torch.Tensor], int]:
        """Forward + backward of one micro-batch (on the device); returns the task's detached metrics (no host sync)
        and the number of samples."""
        ctx = self.ddp_model.no_sync() if (self.dist.distributed and not sync) else nullcontext()
        with ctx:
            with _autocast(self.device, self.amp_dtype):
                out = self.task.training_step(self.ddp_model, batch)
            (out.loss / self.settings.accum_steps).backward()
        return out.metrics, out.num_samples

    def _optimizer_step(self) -> torch.Tensor | float:
        clip = self.settings.grad_clip
        grad_norm: torch.Tensor | float = float("nan")
        if clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return grad_norm

    def _start(self) -> None:
        if self.resume:
            latest = latest_checkpoint(self.ckpt_dir)
            if latest is not None:
                self.load(latest)
                if self.dist.is_main:
                    print(f"resumed from {latest} (step {self.step}, epoch {self.epoch}, batch {self.batch_in_epoch})")
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name, text in self.files.items():
                (self.out_dir / name).write_text(text)
        self.logger = MetricsLogger(self.out_dir, tensorboard=self.settings.tensorboard, rank=self.dist.rank)
        for cb in self.callbacks:
            cb.on_fit_start(self)

    def _evaluate_epoch(self, finished_epoch: int, skipped: float) -> dict[str, float] | None:
        s = self.settings
        last = self.step >= self.total_steps
        if "val" not in self.eval_loaders or not ((finished_epoch + 1) % s.eval_every == 0 or last):
            return None
        val = self.evaluate("val")
        self.logger.log(self.step, {**val, "epoch": finished_epoch, "skipped_train": skipped}, split="val")
        metric = self.task.monitor[0]
        if self.task.better(val[metric], self.best.get(f"val_{metric}")):
            self.best = {f"val_{metric}": val[metric], "val_loss": val["loss"], "step": self.step}
        if self.dist.is_main:
            shown = " ".join(f"{k} {val[k]:.4f}" for k in dict.fromkeys(("loss", metric)))
            print(f"epoch {finished_epoch} step {self.step}: val {shown}")
        return val

    def fit(self) -> dict[str, Any]:
        """Train to the end (resuming if asked), evaluate, checkpoint and write the report; returns the summary."""
        s = self.settings
        self._start()
        started = time.perf_counter()
        timer = StepTimer(self.device, world_size=self.dist.world_size, skip_first=1)
        self.model.train()
        accum = s.accum_steps
        while self.step < self.total_steps:
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=min(self.batch_in_epoch // accum, self.steps_per_epoch),
                desc=f"epoch {self.epoch}",
                disable=not (self.dist.is_main and s.progress),
                leave=False,
            )
            running: dict[str, torch.Tensor | float] = {}
            n_micro = 0
            epoch_steps = self.batch_in_epoch // accum
            steps_before, fresh_epoch = self.step, self.batch_in_epoch == 0
            batches = self._batches()
            timer.start()
            while self.step < self.total_steps and epoch_steps < self.steps_per_epoch:
                micro = []
                for _ in range(accum):
                    batch = next(batches, None)
                    if batch is None:
                        break
                    micro.append(batch)
                # every rank must take the same number of optimizer steps (uneven shards under DDP)
                if all_reduce_min(len(micro), self.device) < accum:
                    break
                timer.data_done()
                logged: dict[str, float] = {}
                for cb in self.callbacks:  # e.g. the soft-mask ratio of this step, set before its forward
                    logged.update(cb.on_step_start(self) or {})
                samples = 0
                for i, batch in enumerate(micro):
                    batch = batch.to(self.device, non_blocking=True)
                    metrics, n = self._micro_step(batch, sync=i == len(micro) - 1)
                    for k, v in metrics.items():
                        running[k] = running.get(k, 0.0) + v
                    n_micro += 1
                    samples += n
                grad_norm = self._optimizer_step()
                self.batch_in_epoch += len(micro)
                epoch_steps += 1
                timer.step_done(samples=samples)
                bar.update(1)
                if self.step % s.log_every == 0 or self.step == self.total_steps:
                    record = {k: float(v) / max(n_micro, 1) for k, v in running.items()}
                    record.update(
                        lr=self.optimizer.param_groups[0]["lr"],
                        grad_norm=float(grad_norm),
                        epoch=self.epoch,
                        **timer.summary(),
                        **logged,
                    )
                    self.logger.log(self.step, record, split="train")
                    bar.set_postfix({k: f"{record[k]:.3f}" for k in list(running)[:2]})
                    running, n_micro = {}, 0
                if self.step % s.checkpoint_every == 0:
                    self.save()
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step)
                timer.start()
            bar.close()
            if self.step == steps_before and fresh_epoch:
                raise DataError(
                    f"epoch {self.epoch} of {self.train_loader!r} gave no full batch on some rank: "
                    "fewer samples than batch_size x world_size x accum_steps?"
                )
            skipped = float(self.train_loader.global_stats()["skipped"])
            self.skipped_total += int(skipped)
            finished_epoch = self.epoch
            self.epoch += 1
            self.batch_in_epoch = 0
            if self.dist.is_main and skipped:
                print(f"epoch {finished_epoch}: skipped {int(skipped)} corrupt sample(s)")
            val = self._evaluate_epoch(finished_epoch, skipped)
            for cb in self.callbacks:
                cb.on_epoch_end(self, finished_epoch, val)
        self.save()
        summary = self._summary(time.perf_counter() - started, timer)
        self.logger.close()
        self.close()
        if self.dist.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            test_metrics = self.last_metrics.get("test")
            sections = test_metrics.report(self.out_dir / REPORT_DIR, "test") if test_metrics is not None else []
            path = write_report(self.out_dir, summary=summary, title=f"mmblocks run: {self.name}", sections=sections)
            print(f"report: {path}")
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        return summary

    def close(self) -> None:
        """Stop the data-loader workers."""
        for loader in [self.train_loader, *self.eval_loaders.values()]:
            close = getattr(loader, "close", None)
            if close is not None:
                close()

    def _summary(self, seconds: float, timer: StepTimer) -> dict[str, Any]:
        test = self.evaluate("test") if "test" in self.eval_loaders else {}
        if test:
            self.logger.log(self.step, test, split="test")
        n_train = sum(p.numel() for p in self.trainable)
        n_all = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.name,
            "steps": self.step,
            "epochs": self.epoch,
            "seconds": seconds,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            **{k: v for k, v in self.run_info.items() if k != "name"},
            "task": repr(self.task),
            "trainable_params": n_train,
            "frozen_params": n_all - n_train,
            "best_val": self.best,
            "test": test,
            "skipped_corrupt": self.skipped_total,
            "throughput": timer.summary(),
        }
