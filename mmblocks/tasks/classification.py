"""Classification: a `ClassifierHead`, cross-entropy, and top-1 / top-k accuracy, per-class recall and the confusion
matrix as metrics.

Metric definitions follow CLIP_benchmark's ``zeroshot_classification.evaluate`` (and scikit-learn): ``acc`` is top-1
accuracy, ``acc5`` top-k accuracy (k = 5, or the number of classes when fewer), ``mean_per_class_recall`` the mean over
the classes present in the split of ``correct / support`` (scikit-learn's ``balanced_accuracy_score``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import Metrics, StepOutput, Task, all_reduce_sum_
from .registry import register_task

__all__ = ["ClassificationMetrics", "ClassificationTask", "plot_confusion"]


class ClassificationMetrics(Metrics):
    """Loss, top-1 / top-k counts and the ``[C, C]`` confusion matrix (rows: true class, columns: prediction), all
    accumulated on the device. ``update(logits [B, C], batch)`` reads the labels from ``batch.label``."""

    def __init__(self, num_classes: int, device: torch.device, top_k: int = 5, class_names: Sequence[str] = ()):
        self.num_classes, self.top_k = num_classes, min(top_k, num_classes)
        self.class_names = list(class_names)
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-k, samples
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, output: torch.Tensor, batch: Any) -> None:
        labels = batch.field("cls")
        self.add(output, labels)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate ``logits [B, C]`` against ``labels [B]``."""
        if logits.dim() != 2 or logits.shape[-1] != self.num_classes:
            raise ValueError(f"expected logits [B, {self.num_classes}], got {tuple(logits.shape)}")
        logits = logits.float()
        pred = logits.argmax(-1)
        topk = logits.topk(self.top_k, dim=-1).indices
        self.totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        self.totals[1] += (pred == labels).sum()
        self.totals[2] += (topk == labels[:, None]).any(-1).sum()
        self.totals[3] += labels.numel()
        c = self.num_classes
        self.confusion += torch.bincount(labels * c + pred, minlength=c * c).view(c, c)

    def sync(self) -> None:
        all_reduce_sum_([self.totals, self.confusion])

    @property
    def count(self) -> int:
        return int(self.totals[3].item())

    def per_class_recall(self) -> torch.Tensor:
        """``[C]`` recall of each class (NaN for a class absent from the split)."""
        conf = self.confusion.double()
        return conf.diagonal() / conf.sum(1)

    def compute(self) -> dict[str, float]:
        loss, top1, topk, n = self.totals.tolist()
        if n == 0:
            return {"loss": float("nan"), "acc": float("nan"), "acc5": float("nan"), "samples": 0}
        recall = self.per_class_recall()
        present = recall[~recall.isnan()]
        return {
            "loss": loss / n,
            "acc": top1 / n,
            "acc5": topk / n,
            "mean_per_class_recall": float(present.mean()),
            "samples": int(n),
        }

    def report(self, out_dir: Path, split: str) -> list[tuple[str, str]]:
        """``confusion_{split}.json`` (counts, class names) and ``confusion_{split}.png`` (row-normalised), and a
        markdown section with the per-class recall and each class's most frequent wrong prediction."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        conf = self.confusion.cpu()
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        (out_dir / f"confusion_{split}.json").write_text(
            json.dumps({"split": split, "class_names": names, "confusion": conf.tolist()}) + "\n"
        )
        png = out_dir / f"confusion_{split}.png"
        plot_confusion(conf, names, png, title=f"confusion matrix ({split})")
        recall = self.per_class_recall().tolist()
        rows = ["| class | samples | recall | most often taken for |", "|---|---|---|---|"]
        for i, name in enumerate(names):
            support = int(conf[i].sum())
            if support == 0:
                continue
            wrong = conf[i].clone()
            wrong[i] = 0
            j = int(wrong.argmax())
            confused = f"{names[j]} ({int(wrong[j])})" if wrong[j] > 0 else "-"
            rows.append(f"| {name} | {support} | {recall[i]:.3f} | {confused} |")
        body = f"[![confusion matrix ({split})]({png.name})]({png.name})\n\n" + "\n".join(rows) + "\n"
        return [(f"Confusion matrix ({split})", body)]


def plot_confusion(conf: torch.Tensor, names: list[str], path: Path, title: str) -> None:
    """A row-normalised confusion matrix `conf` ``[C, C]`` (rows: true class) as a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = conf.shape[0]
    rows = conf.double() / conf.sum(1, keepdim=True).clamp_min(1)
    side = min(12.0, 3.0 + 0.35 * c)
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= 40:
        ax.set_xticks(range(c), names, rotation=90, fontsize="small")
        ax.set_yticks(range(c), names, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")


@register_task("classification")
class ClassificationTask(Task):
    """Learn the ``cls`` label of each sample with a `ClassifierHead` (``model.head`` in a config).

    Args:
        num_classes: number of classes (a config reads it from ``model.num_classes`` or the shards' ``index.json``).
        label_smoothing: cross-entropy label smoothing during training (evaluation reports plain cross-entropy).
        top_k: the k of the top-k accuracy (``acc5``; clipped to the number of classes).
        class_names: names for the confusion matrix and report (default: the class indices).
    """

    fields = ("cls",)
    default_head = "classifier"
    monitor = ("acc", "max")

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        top_k: int = 5,
        class_names: Sequence[str] | None = None,
    ):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes, self.label_smoothing, self.top_k = num_classes, float(label_smoothing), int(top_k)
        self.class_names = list(class_names) if class_names is not None else None

    def build_head(self, in_dim: int, name: str | None = None, **kwargs: Any):
        return super().build_head(in_dim, name, num_classes=self.num_classes, **kwargs)

    def training_step(self, model: Callable[..., Any], batch: Any) -> StepOutput:
        labels = batch.field("cls")
        logits, aux = self.forward(model, batch)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        total = loss + aux if isinstance(aux, torch.Tensor) else loss
        acc = (logits.argmax(-1) == labels).float().mean()
        return StepOutput(total, {"loss": loss.detach(), "acc": acc}, labels.numel())

    def chance(self) -> dict[str, float]:
        """Uniform prediction over C classes: loss ln C (label smoothing leaves it so), accuracy 1 / C (balanced
        test sets, as every shipped dataset's)."""
        return {"loss": math.log(self.num_classes), "acc": 1.0 / self.num_classes}

    def new_metrics(self, device: torch.device) -> ClassificationMetrics:
        return ClassificationMetrics(self.num_classes, device, self.top_k, self.class_names or ())

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing}, top_k={self.top_k}"
