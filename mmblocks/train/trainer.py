"""`Trainer`: one config -> a trained, evaluated, checkpointed and reported encoder.

Single process or `torchrun` (DDP). AdamW over the trainable parameters only (no decay on norms, biases and
position/cls tokens), warmup + cosine, clipping, accumulation, bf16 autocast on GPU, optional `torch.compile`,
atomic checkpoints every N steps with exact resume, JSONL + TensorBoard metrics, and a final report folder.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..builders import build_encoder
from ..config import dump_config, load_config
from ..layers.soft_mask import advance_soft_masks, soft_mask_modules
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistInfo, all_reduce_min, all_reduce_sum, barrier, init_distributed
from .logging import MetricsLogger, StepTimer
from .report import write_report
from .schedule import build_scheduler, param_groups

__all__ = ["Trainer", "train", "evaluate_checkpoint", "trainable_state_dict"]

StepCallback = Callable[["Trainer", int], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in params}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes, by name: the trainable parameters and the persistent buffers (BatchNorm running
    statistics of a point tokenizer, ...). Frozen LLM weights are rebuilt from their source, never saved."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach() for n, b in _persistent_buffers(model).items()})
    return state


def ensure_dataset(data_cfg: Mapping[str, Any], dist_info: DistInfo) -> None:
    """Make the offline dataset into ``data.root`` when it is named and missing (rank 0 writes, others wait)."""
    root = Path(data_cfg["root"])
    if (root / "index.json").is_file():
        return
    name = data_cfg["dataset"]
    if name is None:
        raise FileNotFoundError(
            f"no shards at {root} (index.json missing): write some with `mmblocks shards write ...` or set "
            "data.dataset to an offline dataset (digits, textures, meshes, keywords, moving-digits)"
        )
    if dist_info.is_main:
        from ..data import make_dataset

        make_dataset(name, root)
    barrier()


class Trainer:
    """Train `build_encoder(cfg)` on the shards of ``cfg["data"]``.

    Args:
        cfg: a config dict or YAML path (validated by `load_config`).
        overrides: ``key=value`` strings applied on top.
        resume: continue from the latest checkpoint in ``train.out_dir/checkpoints``.
        callbacks: functions called as ``fn(trainer, step)`` after every optimizer step (rank-local).
    """

    def __init__(
        self,
        cfg: Mapping[str, Any] | str | Path,
        overrides: tuple[str, ...] | list[str] = (),
        *,
        resume: bool = False,
        callbacks: list[StepCallback] | None = None,
    ):
        self.cfg = load_config(cfg, overrides)
        self.resume = resume
        self.callbacks = list(callbacks or [])
        t = self.cfg["train"]
        self.out_dir = Path(t["out_dir"])
        self.dist = init_distributed(t["device"])
        self.device = self.dist.device
        seed_everything(t["seed"])
        ensure_dataset(self.cfg["data"], self.dist)
        if self.cfg["model"]["llm"]["seed"] is None:  # random-init controls must rebuild identically on resume
            self.cfg["model"]["llm"]["seed"] = t["seed"]
        self.model = build_encoder(self.cfg, verbose=self.dist.is_main).to(self.device)
        self.has_soft_masks = bool(soft_mask_modules(self.model))
        if self.model.head is None:
            raise ValueError("cannot train without a head: set model.num_classes or write shards with class names")
        if t["grad_checkpointing"]:
            self.model.set_grad_checkpointing(True)
        self.amp_dtype = self._amp_dtype(t["amp"])
        self.train_loader = self._loader(self.cfg["data"]["train_split"], train=True)
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = t["max_steps"] or self.steps_per_epoch * t["epochs"]
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, t["weight_decay"]),
            lr=t["lr"],
            betas=tuple(t["betas"]),
            fused=self.device.type == "cuda",
        )
        warmup = (
            t["warmup_steps"] if t["warmup_steps"] is not None else round(t["warmup_epochs"] * self.steps_per_epoch)
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            total_steps=self.total_steps,
            warmup_steps=min(warmup, self.total_steps),
            min_lr_ratio=t["min_lr_ratio"],
            schedule=t["schedule"],
        )
        self.ddp_model: nn.Module = self.model
        if t["compile"]:
            self.ddp_model = torch.compile(self.ddp_model)
        if self.dist.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.ddp_model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, float] = {}
        self.history: list[dict] = []
        self.skipped_total = 0
        self.logger: MetricsLogger | None = None
        self._eval_loaders: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup helpers
    def _amp_dtype(self, amp: str) -> torch.dtype | None:
        if amp == "none" or (amp == "auto" and self.device.type != "cuda"):
            return None
        if amp == "fp16":
            return torch.float16
        return torch.bfloat16

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, split: str, train: bool):
        from ..data import build_loader

        d = self.cfg["data"]
        augment: Any = d["augment"] and train
        if augment and d["augment_policy"] is not None:
            augment = d["augment_policy"]
        return build_loader(
            d["root"],
            split,
            batch_size=d["batch_size"] if train else (d["eval_batch_size"] or d["batch_size"]),
            image_size=d["image_size"],
            modality=d["modality"],
            num_points=d["num_points"],
            sample_rate=d["sample_rate"],
            max_seconds=d["max_seconds"],
            num_frames=d["num_frames"],
            frame_sampling=d["frame_sampling"],
            frame_stride=d["frame_stride"],
            motion_vectors=d["motion_vectors"],
            num_workers=d["num_workers"],
            shuffle=train,
            seed=self.cfg["train"]["seed"],
            resampled=d["resampled"] and train,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            augment=augment,
            channels=d["channels"],
            drop_last=False,
        )

    def _steps_per_epoch(self) -> int:
        t, d = self.cfg["train"], self.cfg["data"]
        if t["steps_per_epoch"]:
            return t["steps_per_epoch"]
        try:  # the loader knows how many batches this rank yields (each worker's last one may be short)
            batches = len(self.train_loader)
        except TypeError:  # resampled without a nominal epoch size
            batches = math.ceil(self.train_loader.num_samples / self.dist.world_size / d["batch_size"])
        return max(1, batches // t["accum_steps"])

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
                extra={"best": self.best, "config_name": self.cfg["name"], "skipped_total": self.skipped_total},
                keep=self.cfg["train"]["keep_checkpoints"],
            )
        barrier()
        return path

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, optimizer=self.optimizer, scheduler=self.scheduler, map_location=self.device)
        missing = set(trainable_state_dict(self.model)) - set(state["model_state"])
        if missing:
            raise KeyError(f"checkpoint {path} lacks trainable weights, e.g. {sorted(missing)[:3]}")
        params = {**dict(self.model.named_parameters()), **_persistent_buffers(self.model)}
        with torch.no_grad():
            for name, value in state["model_state"].items():
                if name not in params:
                    raise KeyError(f"checkpoint {path} has weights for {name!r}, which this model does not have")
                params[name].copy_(value.to(params[name].device))
        self.step = state["step"]
        self.epoch = state["data_state"]["epoch"]
        self.batch_in_epoch = state["data_state"]["batch_in_epoch"]
        self.best = dict(state["extra"].get("best", {}))
        self.skipped_total = int(state["extra"].get("skipped_total", 0))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Loss and top-1 accuracy on `split`, every sample counted exactly once across ranks."""
        model = self.model
        was_training = model.training
        model.eval()
        if split not in self._eval_loaders:  # workers persist between evaluations
            self._eval_loaders[split] = self._loader(split, train=False)
        loader = self._eval_loaders[split]
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, correct; one sync at the end
        count = 0
        for batch in loader:
            batch = batch.to(self.device, non_blocking=True)
            labels = batch.label
            args, kwargs = batch.model_inputs()
            with self._autocast():
                logits = model(*args, **kwargs)
            totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
            totals[1] += (logits.argmax(-1) == labels).sum()
            count += labels.numel()
        skipped = float(loader.global_stats()["skipped"])
        loss_sum, correct, count = all_reduce_sum([*totals.tolist(), count], self.device)
        model.train(was_training)
        if count == 0:
            raise RuntimeError(f"split {split!r} of {self.cfg['data']['root']} yielded no samples")
        return {"loss": loss_sum / count, "acc": correct / count, "samples": count, "skipped": skipped}

    # ------------------------------------------------------------------ training
    def _batches(self) -> Iterator[Any]:
        self.train_loader.set_epoch(self.epoch)
        it = iter(self.train_loader)
        for _ in range(self.batch_in_epoch):  # resume mid-epoch: the order is a function of (seed, epoch)
            next(it, None)
        yield from it

    def _micro_step(self, batch: Any, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of one micro-batch (a `Batch` on the device); returns the detached loss and accuracy
        (no host sync)."""
        labels = batch.label
        args, kwargs = batch.model_inputs()
        ctx = self.ddp_model.no_sync() if (self.dist.distributed and not sync) else nullcontext()
        with ctx:
            with self._autocast():
                logits = self.ddp_model(*args, **kwargs)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg["train"]["label_smoothing"])
                aux = self.model.aux_loss
                total = loss + aux if isinstance(aux, torch.Tensor) else loss
            (total / self.cfg["train"]["accum_steps"]).backward()
        return loss.detach(), (logits.argmax(-1) == labels).float().mean()

    def _optimizer_step(self) -> torch.Tensor | float:
        clip = self.cfg["train"]["grad_clip"]
        grad_norm: torch.Tensor | float = float("nan")
        if clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return grad_norm

    def fit(self) -> dict[str, Any]:
        """Train to the end (resuming if asked), evaluate, checkpoint and write the report; returns the summary."""
        t = self.cfg["train"]
        if self.resume:
            latest = latest_checkpoint(self.ckpt_dir)
            if latest is not None:
                self.load(latest)
                if self.dist.is_main:
                    print(f"resumed from {latest} (step {self.step}, epoch {self.epoch}, batch {self.batch_in_epoch})")
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_config(self.cfg))
        self.logger = MetricsLogger(self.out_dir, tensorboard=t["tensorboard"], rank=self.dist.rank)
        started = time.perf_counter()
        timer = StepTimer(self.device, world_size=self.dist.world_size, skip_first=1)
        self.model.train()
        accum = t["accum_steps"]
        while self.step < self.total_steps:
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=min(self.batch_in_epoch // accum, self.steps_per_epoch),
                desc=f"epoch {self.epoch}",
                disable=not (self.dist.is_main and t["progress"]),
                leave=False,
            )
            run_loss = run_acc = 0.0
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
                # soft attention masks (iLLaMA): the mix ratio is a function of the step, set before the forward
                soft = {}
                if self.has_soft_masks:  # found once: no walk over every module on every step
                    soft = advance_soft_masks(
                        self.model, self.step, epoch=self.epoch, steps_per_epoch=self.steps_per_epoch
                    )
                samples = 0
                for i, batch in enumerate(micro):
                    batch = batch.to(self.device, non_blocking=True)
                    loss, acc = self._micro_step(batch, sync=i == len(micro) - 1)
                    run_loss, run_acc, n_micro = run_loss + loss, run_acc + acc, n_micro + 1
                    samples += batch.label.numel()
                grad_norm = self._optimizer_step()
                self.batch_in_epoch += len(micro)
                epoch_steps += 1
                timer.step_done(samples=samples)
                bar.update(1)
                if self.step % t["log_every"] == 0 or self.step == self.total_steps:
                    perf = timer.summary()
                    metrics = {
                        "loss": float(run_loss) / max(n_micro, 1),
                        "acc": float(run_acc) / max(n_micro, 1),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": float(grad_norm),
                        "epoch": self.epoch,
                        **perf,
                    }
                    if soft:
                        metrics["soft_mask_r"] = next(iter(soft.values()))
                    self.logger.log(self.step, metrics, split="train")
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.3f}")
                    run_loss = run_acc = 0.0
                    n_micro = 0
                if self.step % t["checkpoint_every"] == 0:
                    self.save()
                for cb in self.callbacks:
                    cb(self, self.step)
                timer.start()
            bar.close()
            if self.step == steps_before and fresh_epoch:
                raise RuntimeError(
                    f"epoch {self.epoch} of {self.cfg['data']['root']} gave no full batch on some rank: "
                    "fewer samples than batch_size x world_size x accum_steps?"
                )
            skipped = float(self.train_loader.global_stats()["skipped"])
            self.skipped_total += int(skipped)
            finished_epoch = self.epoch
            self.epoch += 1
            self.batch_in_epoch = 0
            if self.dist.is_main and skipped:
                print(f"epoch {finished_epoch}: skipped {int(skipped)} corrupt sample(s)")
            val_split = self.cfg["data"]["val_split"]
            last = self.step >= self.total_steps
            if val_split and ((finished_epoch + 1) % t["eval_every"] == 0 or last):
                val = self.evaluate(val_split)
                self.logger.log(self.step, {**val, "epoch": finished_epoch, "skipped_train": skipped}, split="val")
                if val["acc"] >= self.best.get("val_acc", -1.0):
                    self.best = {"val_acc": val["acc"], "val_loss": val["loss"], "step": self.step}
                if self.dist.is_main:
                    print(f"epoch {finished_epoch} step {self.step}: val loss {val['loss']:.4f} acc {val['acc']:.4f}")
        self.save()
        summary = self._summary(time.perf_counter() - started, timer)
        self.logger.close()
        self.close()
        if self.dist.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            path = write_report(self.out_dir, summary=summary, title=f"mmblocks run: {self.cfg['name']}")
            print(f"report: {path}")
        return summary

    def close(self) -> None:
        """Stop the data-loader workers."""
        for loader in [self.train_loader, *self._eval_loaders.values()]:
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        self._eval_loaders.clear()

    def _summary(self, seconds: float, timer: StepTimer) -> dict[str, Any]:
        test_split = self.cfg["data"]["test_split"]
        test = self.evaluate(test_split) if test_split else {}
        if test:
            self.logger.log(self.step, test, split="test")
        m = self.cfg["model"]
        n_train = sum(p.numel() for p in self.model.trainable_parameters())
        n_all = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.cfg["name"],
            "steps": self.step,
            "epochs": self.epoch,
            "seconds": seconds,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "tokenizer": m["tokenizer"]["name"] or "image_patches",
            "backbone": m["backbone"]["name"] if m["backbone"]["type"] == "vit" else m["backbone"]["type"],
            "llm": (
                f"{m['llm']['source']} layers {m['llm']['layers']} tune={m['llm']['tune']}"
                if m["llm"]["enabled"]
                else "none"
            ),
            "trainable_params": n_train,
            "frozen_params": n_all - n_train,
            "best_val": self.best,
            "test": test,
            "skipped_corrupt": self.skipped_total,
            "throughput": timer.summary(),
        }


def train(
    config: str | Path | Mapping[str, Any], overrides: tuple[str, ...] | list[str] = (), resume: bool = False
) -> dict[str, Any]:
    """`mmblocks train CONFIG [overrides]` as a function."""
    return Trainer(config, overrides, resume=resume).fit()


def evaluate_checkpoint(
    config: str | Path | Mapping[str, Any],
    checkpoint: str | Path,
    overrides: tuple[str, ...] | list[str] = (),
    splits: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`mmblocks eval CONFIG --checkpoint CKPT`: load the trainable weights and evaluate val/test."""
    trainer = Trainer(config, overrides)
    trainer.load(Path(checkpoint))  # a step-* folder, or a checkpoints folder (its latest)
    d = trainer.cfg["data"]
    names = splits or tuple(s for s in (d["val_split"], d["test_split"]) if s)
    try:
        return {split: trainer.evaluate(split) for split in names}
    finally:
        trainer.close()
