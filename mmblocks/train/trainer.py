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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError, MMBlocksError
from ..tasks.base import Metrics, Task
from .callbacks import Callback, FunctionCallback, default_callbacks
from .checkpoint import (
    CheckpointError,
    checkpoint_info,
    load_checkpoint,
    save_checkpoint,
    trainable_state_dict,
)
from .distributed import DistInfo, all_reduce_min, barrier, init_distributed
from .fsdp import (
    apply_fsdp,
    fsdp_full_optimizer_state,
    fsdp_full_trainable_state,
    fsdp_load_optimizer_state,
    fsdp_load_trainable_state,
    fsdp_trainable_names,
    fsdp_unsharded,
)
from .instrument import StageStats
from .ledger import DataLedger
from .logging import MetricsLogger, StepTimer
from .report import REPORT_DIR, write_report
from .run_folder import SUMMARY_FILE, prepare_run_folder
from .schedule import build_scheduler, param_groups
from .settings import TrainSettings

__all__ = ["ResumeMismatchError", "Trainer", "amp_dtype", "evaluate", "seed_everything"]

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


class ResumeMismatchError(MMBlocksError, ValueError):
    """``resume`` with settings that change the data order or the step count the checkpoint was saved under."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    the task's numbers plus ``lost`` (samples the loader could not deliver: `ShardLoader.stats`) and the reduced
    `Metrics` (for the task's report). A loader with ``check_losses`` raises beyond its ``max_lost_fraction``."""
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
        lost = f" (lost {stats['lost']}: {'; '.join(stats['reasons']) or '-'})" if stats.get("lost") else ""
        raise DataError(f"{loader!r} yielded no samples to evaluate{lost}")
    if hasattr(loader, "check_losses"):
        loader.check_losses(stats)
    return {**results, "lost": float(stats.get("lost", 0))}, metrics


class Trainer:
    """Train `model` on `task` with the batches of `train_loader`.

    Args:
        model: the model the task drives (moved to the run's device here).
        task: what is learned (`mmblocks.tasks.create_task`); its head is already part of `model`.
        train_loader: yields batches with ``.to(device)``; ``set_epoch(epoch)`` reseeds it (exact resume needs it),
            ``len()`` is its batches per epoch, ``global_stats()`` its sample counts, ``signature()`` what fixes its
            order, ``check_losses(stats)`` its lost-sample limit (`build_loader` has all). An epoch is one pass over
            the loader, however many samples it lost; ``settings.epochs`` epochs are run (or ``max_steps`` steps).
        val_loader, test_loader: evaluated after epochs / at the end (None: skipped).
        settings: a `TrainSettings`; `overrides` (its field names, e.g. ``lr=3e-4, out_dir="runs/x"``) replace
            fields. ``out_dir`` is required.
        callbacks: `Callback` objects or functions ``fn(trainer, step)`` called after every optimizer step
            (rank-local), run after `default_callbacks`.
        resume: continue from the latest checkpoint in ``out_dir/checkpoints`` (an error when there is none, or when
            the data order or step count would differ from the checkpoint's: `ResumeMismatchError`).
        overwrite: ``out_dir`` may hold a previous run: move it aside (`prepare_run_folder`) instead of refusing.
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
        overwrite: bool = False,
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
        self.resume, self.overwrite = resume, overwrite
        self.run_info = dict(run_info or {})
        self.files = dict(files or {})
        self.callbacks: list[Callback] = default_callbacks() + [
            cb if isinstance(cb, Callback) else FunctionCallback(cb) for cb in callbacks
        ]
        if s.instrument_every:
            self.callbacks.append(StageStats(s.instrument_every))
        self.out_dir = Path(s.out_dir)
        self.dist = dist if dist is not None else init_distributed(s.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        if s.grad_checkpointing:
            enable = getattr(self.model, "set_grad_checkpointing", None)
            if enable is None:
                raise ValueError(f"grad_checkpointing needs a model with set_grad_checkpointing(), not {type(model)}")
            enable(True)
        self.fsdp = bool(s.fsdp and self.dist.distributed)
        if s.fsdp and not self.fsdp:
            warnings.warn(
                "train.fsdp needs several processes (torchrun); this single process trains unsharded", stacklevel=2
            )
        if self.fsdp:  # before the optimizer: the parameters become sharded DTensors
            apply_fsdp(self.model, self.device)
        self.amp_dtype = amp_dtype(s.amp, self.device)
        self.train_loader = train_loader
        self.eval_loaders = {k: v for k, v in (("val", val_loader), ("test", test_loader)) if v is not None}
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = s.max_steps or self.steps_per_epoch * s.epochs
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, s.weight_decay, lr=s.lr, lr_scale=s.lr_scale),
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
        if self.dist.distributed and not self.fsdp:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.ddp_model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.trained_in_epoch = 0  # samples the optimizer saw in the current epoch (for the data ledger)
        self.best: dict[str, float] = {}
        self.ledger = DataLedger()
        self.logger: MetricsLogger | None = None
        self.last_metrics: dict[str, Metrics] = {}

    @property
    def name(self) -> str:
        return str(self.run_info.get("name") or self.out_dir.name)

    def _steps_per_epoch(self) -> int:
        """Optimizer steps in a full epoch, from the loader's nominal size (``index.json`` counts): the schedule's
        length. An epoch that loses samples ends early; it is still one epoch."""
        s = self.settings
        if s.steps_per_epoch:
            return s.steps_per_epoch
        try:  # the loader knows how many batches this rank yields (each worker's last one may be short)
            batches = len(self.train_loader)
        except TypeError as err:  # resampled without a nominal epoch size, or shards without index.json counts
            samples, batch_size = getattr(self.train_loader, "num_samples", None), self.train_loader.batch_size
            if samples is None:
                raise DataError(
                    f"the size of an epoch of {self.train_loader!r} is unknown ({err}): set steps_per_epoch (or "
                    "max_steps), or give the shards an index.json with their sample counts"
                ) from None
            batches = math.ceil(samples / self.dist.world_size / batch_size)
        return max(1, batches // s.accum_steps)

    def data_signature(self) -> dict[str, Any]:
        """What fixes the batches, their order and the steps of an epoch: the train loader's ``signature()``, the
        accumulation and the steps per epoch. A resumed run must have the same."""
        sign = getattr(self.train_loader, "signature", None)
        return {
            **(sign() if sign is not None else {}),
            "accum_steps": self.settings.accum_steps,
            "steps_per_epoch": self.steps_per_epoch,
            **({"fsdp": True} if self.fsdp else {}),  # its optimizer state is keyed by name: resumed under FSDP only
        }

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self) -> Path | None:
        path = None
        if self.fsdp:  # gathered to full tensors on rank 0; every rank takes part
            model_state = fsdp_full_trainable_state(self.model)
            optimizer: Any = fsdp_full_optimizer_state(self.model, self.optimizer)
        else:
            model_state = trainable_state_dict(self.model) if self.dist.is_main else {}
            optimizer = self.optimizer
        if self.dist.is_main:
            path = save_checkpoint(
                self.ckpt_dir,
                self.step,
                model_state=model_state,
                optimizer=optimizer,
                scheduler=self.scheduler,
                data_state={
                    "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch,
                    "trained_in_epoch": self.trained_in_epoch,
                },
                extra={
                    "best": self.best,
                    "config_name": self.name,
                    "data_signature": self.data_signature(),
                    "ledger": self.ledger.entries,
                    "task": self.task.checkpoint_state(),
                },
                keep=self.settings.keep_checkpoints,
            )
        barrier()
        return path

    def load(self, path: Path) -> None:
        """Resume from the checkpoint at `path`: its data signature (which must match: `ResumeMismatchError` names
        the differing keys), the weights (which must fit this model exactly), then the optimizer, scheduler, RNG and
        data position."""
        self._check_signature(path, checkpoint_info(path)["extra"].get("data_signature"))
        if self.fsdp:
            state = load_checkpoint(path, scheduler=self.scheduler, optimizer=_FSDPOptimizer(self), map_location="cpu")
            missing = sorted(set(fsdp_trainable_names(self.model)) - set(state["model_state"]))
            if missing:
                raise CheckpointError(f"{path} lacks trainable tensors of this model: {missing[:5]}")
            fsdp_load_trainable_state(self.model, state["model_state"])
        else:
            state = load_checkpoint(
                path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, map_location=self.device
            )
        self.step = state["step"]
        self.epoch = state["data_state"]["epoch"]
        self.batch_in_epoch = state["data_state"]["batch_in_epoch"]
        self.trained_in_epoch = state["data_state"].get("trained_in_epoch", 0)
        self.best = dict(state["extra"].get("best", {}))
        self.ledger = DataLedger(state["extra"].get("ledger", []))

    def _check_signature(self, path: Path, saved: Mapping[str, Any] | None) -> None:
        if saved is None:  # a checkpoint from before signatures: nothing to compare
            return
        now = self.data_signature()
        differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if differ:
            shown = "; ".join(f"{k}: checkpoint {_short(saved.get(k))}, now {_short(now.get(k))}" for k in differ)
            raise ResumeMismatchError(
                f"cannot resume from {path}: the data order or the steps per epoch would differ from the run that "
                f"saved it ({shown}). Change these back (batch size, workers x ranks, shards, seed, accumulation), "
                "or start a new run (--overwrite or another out_dir)"
            )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str) -> dict[str, float]:
        """The task's metrics on the ``val`` or ``test`` loader, every sample counted exactly once across ranks."""
        if split not in self.eval_loaders:
            raise ValueError(f"this trainer has no {split!r} loader (it has {sorted(self.eval_loaders)})")
        with fsdp_unsharded(self.model) if self.fsdp else nullcontext():
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
        if self.fsdp:  # FSDP2 skips its reduce-scatter instead of DDP's no_sync
            self.model.set_requires_gradient_sync(sync)
            ctx: Any = nullcontext()
        else:
            ctx = self.ddp_model.no_sync() if (self.dist.distributed and not sync) else nullcontext()
        with ctx:
            with _autocast(self.device, self.amp_dtype):
                out = self.task.training_step(self.ddp_model, batch)
            (out.loss / self.settings.accum_steps).backward()
        return out.metrics, out.num_samples

    def _optimizer_step(self) -> torch.Tensor | float:
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)
        clip = self.settings.grad_clip
        grad_norm: torch.Tensor | float = float("nan")
        if clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor norm over the shards
                grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return grad_norm

    def _start(self) -> None:
        latest = prepare_run_folder(
            self.out_dir, resume=self.resume, overwrite=self.overwrite, is_main=self.dist.is_main
        )
        barrier()  # a run moved aside (overwrite) is gone on every rank before anything is written
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

    def _finished(self) -> bool:
        """``max_steps`` steps taken, else ``epochs`` epochs run (an epoch that lost samples is a whole epoch)."""
        s = self.settings
        return self.step >= s.max_steps if s.max_steps else self.epoch >= s.epochs

    def _account(self, split: str, loader: Any, epoch: int, trained: int | None = None) -> None:
        """Record the loader's counts of `epoch` in the ledger and ``metrics.jsonl``, say what was lost, and stop
        the run beyond the loader's ``max_lost_fraction``."""
        if not hasattr(loader, "global_stats"):
            return
        stats = loader.global_stats()
        entry = self.ledger.add(split, epoch, stats, trained)
        record = {k: v for k, v in entry.items() if k != "split" and v is not None}
        self.logger.log(self.step, record, split=f"data_{split}")
        if self.dist.is_main and entry["lost"]:
            print(f"epoch {epoch}: {DataLedger.describe(entry)}; first: {'; '.join(stats['reasons']) or '-'}")
        if hasattr(loader, "check_losses"):
            loader.check_losses(stats)

    def _evaluate_epoch(self, finished_epoch: int) -> dict[str, float] | None:
        s = self.settings
        if "val" not in self.eval_loaders or not ((finished_epoch + 1) % s.eval_every == 0 or self._finished()):
            return None
        val = self.evaluate("val")
        self._account("val", self.eval_loaders["val"], finished_epoch)
        self.logger.log(self.step, {**val, "epoch": finished_epoch}, split="val")
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
        while not self._finished():
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
            while not (s.max_steps and self.step >= s.max_steps) and epoch_steps < self.steps_per_epoch:
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
                self.trained_in_epoch += samples
                timer.step_done(samples=samples)
                bar.update(1)
                if self.step % s.log_every == 0 or self.step == self.total_steps:
                    record = self._log_train(running, n_micro, grad_norm, timer, logged)
                    bar.set_postfix({k: f"{record[k]:.3f}" for k in list(running)[:2]})
                    running, n_micro = {}, 0
                if self.step % s.checkpoint_every == 0:
                    self.save()
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step)
                timer.start()
            bar.close()
            if n_micro:  # the epoch's last steps, short of a log_every window (an epoch that lost samples)
                self._log_train(running, n_micro, grad_norm, timer, logged)
            if self.step == steps_before and fresh_epoch:
                stats = self.train_loader.global_stats() if hasattr(self.train_loader, "global_stats") else {}
                lost = f" It lost {stats['lost']}: {'; '.join(stats['reasons'])}." if stats.get("lost") else ""
                raise DataError(
                    f"epoch {self.epoch} of {self.train_loader!r} gave no full batch on some rank: "
                    f"fewer samples than batch_size x world_size x accum_steps?{lost}"
                )
            self._drain(batches)
            self._account("train", self.train_loader, self.epoch, self.trained_in_epoch)
            finished_epoch = self.epoch
            self.epoch += 1
            self.batch_in_epoch = self.trained_in_epoch = 0
            val = self._evaluate_epoch(finished_epoch)
            for cb in self.callbacks:
                cb.on_epoch_end(self, finished_epoch, val)
        self.save()
        summary = self._summary(time.perf_counter() - started, timer)
        self.logger.close()
        self.close()
        if self.dist.is_main:
            (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
            test_metrics = self.last_metrics.get("test")
            sections = test_metrics.report(self.out_dir / REPORT_DIR, "test") if test_metrics is not None else []
            sections = [*sections, self.ledger.section()]
            path = write_report(self.out_dir, summary=summary, title=f"mmblocks run: {self.name}", sections=sections)
            print(f"report: {path}")
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        return summary

    def _base_lr(self) -> float:
        """The current lr of the groups at ``train.lr`` (not one scaled by ``train.lr_scale``)."""
        groups = self.optimizer.param_groups
        base = next((g for g in groups if g.get("initial_lr") == self.settings.lr), groups[0])
        return float(base["lr"])

    def _log_train(
        self,
        running: Mapping[str, torch.Tensor | float],
        n_micro: int,
        grad_norm: torch.Tensor | float,
        timer: StepTimer,
        logged: Mapping[str, float],
    ) -> dict[str, float]:
        """Log the mean of the task's metrics over the `n_micro` micro-batches since the last record."""
        record = {k: float(v) / max(n_micro, 1) for k, v in running.items()}
        record.update(
            lr=self._base_lr(),
            grad_norm=float(grad_norm),
            epoch=self.epoch,
            **timer.summary(),
            **logged,
        )
        self.logger.log(self.step, record, split="train")
        return record

    def _drain(self, batches: Iterator[Any]) -> None:
        """Read the rest of an epoch that ended before its loader did (a rank with one batch more than another
        under DDP, a partial accumulation) so that the loader's counts cover the whole epoch; not when the epoch
        was cut by ``steps_per_epoch`` or ``max_steps`` (a resampled loader never ends)."""
        s = self.settings
        if s.steps_per_epoch or (s.max_steps and self.step >= s.max_steps):
            return
        try:
            len(self.train_loader)
        except TypeError:  # resampled forever
            return
        for _ in batches:
            pass

    def close(self) -> None:
        """Stop the data-loader workers."""
        for loader in [self.train_loader, *self.eval_loaders.values()]:
            close = getattr(loader, "close", None)
            if close is not None:
                close()

    def _summary(self, seconds: float, timer: StepTimer) -> dict[str, Any]:
        test = self.evaluate("test") if "test" in self.eval_loaders else {}
        if test:
            self._account("test", self.eval_loaders["test"], self.epoch - 1)
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
            "monitor": {"metric": self.task.monitor[0], "mode": self.task.monitor[1]},
            "chance": self.task.chance(),
            "trainable_params": n_train,
            "frozen_params": n_all - n_train,
            "best_val": self.best,
            "test": test,
            "data": self.ledger.summary(),
            "throughput": timer.summary(),
        }


class _FSDPOptimizer:
    """`load_checkpoint` hands the stored (full, name-keyed) optimizer state to ``load_state_dict``; this puts it
    into the sharded optimizer."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fsdp_load_optimizer_state(self.trainer.model, self.trainer.optimizer, state)
