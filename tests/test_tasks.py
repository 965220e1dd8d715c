"""Tasks: classification's loss and metrics against scikit-learn's definitions, its report, the registry."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, top_k_accuracy_score

from mmblocks.data import Batch, MissingKeyError
from mmblocks.heads import ClassifierHead, list_heads
from mmblocks.tasks import ClassificationTask, StepOutput, Task, create_task, list_tasks
from tokenizers_mm import Tokens
from tokenizers_mm.registry import RegistryArgumentError, RegistryError

C = 7


def _batch(labels: torch.Tensor | None, n: int | None = None, **fields) -> Batch:
    n = len(labels) if labels is not None else n
    return Batch(torch.zeros(n, 1), labels, [f"k{i}" for i in range(n)], fields=fields)


def _logits_and_labels(seed: int, n: int = 300):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C - 1, (n,), generator=g)  # class C-1 never occurs in the split
    logits = torch.randn(n, C, generator=g) + 2.0 * F.one_hot(labels, C) * torch.rand(n, 1, generator=g)
    return logits, labels


def test_metrics_equal_sklearn_over_many_batches():
    task = ClassificationTask(C)
    metrics = task.new_metrics(torch.device("cpu"))
    logits, labels = _logits_and_labels(0)
    for lo, la in zip(logits.split(37), labels.split(37)):  # uneven batches accumulate exactly
        metrics.update(lo, _batch(la))
    metrics.sync()  # a no-op without a process group
    got = metrics.compute()
    y, scores, pred = labels.numpy(), logits.numpy(), logits.argmax(-1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that class C-1 is predicted but never true
        recall = balanced_accuracy_score(y, pred)
    assert got["samples"] == 300
    assert got["acc"] == pytest.approx((pred == y).mean(), abs=1e-12)
    assert got["acc5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=range(C)), abs=1e-12)
    assert got["mean_per_class_recall"] == pytest.approx(recall, abs=1e-12)
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    np.testing.assert_array_equal(metrics.confusion.numpy(), confusion_matrix(y, pred, labels=range(C)))


def test_top_k_is_clipped_to_the_class_count():
    metrics = ClassificationTask(3, top_k=5).new_metrics(torch.device("cpu"))
    metrics.update(torch.randn(10, 3), _batch(torch.randint(0, 3, (10,))))
    assert metrics.compute()["acc5"] == 1.0
    with pytest.raises(ValueError, match=r"expected logits \[B, 3\]"):
        metrics.update(torch.randn(10, 4), _batch(torch.randint(0, 3, (10,))))


class _Model(torch.nn.Module):
    """Logits from a linear layer over the inputs; reports a fixed auxiliary loss like MMEncoder(return_aux=True)."""

    def __init__(self, aux: float | None):
        super().__init__()
        self.fc = torch.nn.Linear(1, C)
        self.aux = aux

    def forward(self, x, return_aux=False):
        out = self.fc(x)
        if return_aux:
            return out, torch.tensor(self.aux) if self.aux is not None else 0.0
        return out


@pytest.mark.parametrize("aux", [None, 0.25])
def test_training_step_adds_the_auxiliary_loss_the_model_returns(aux):
    torch.manual_seed(0)
    task = ClassificationTask(C, label_smoothing=0.1)
    model = _Model(aux)
    batch = Batch(torch.randn(16, 1), torch.randint(0, C, (16,)), ["k"] * 16)
    out = task.training_step(model, batch)
    assert isinstance(out, StepOutput) and out.num_samples == 16
    logits = model(batch.inputs)
    ce = F.cross_entropy(logits, batch.label, label_smoothing=0.1)
    torch.testing.assert_close(out.metrics["loss"], ce.detach())
    torch.testing.assert_close(out.loss, ce + (aux or 0.0))
    assert out.metrics["acc"] == (logits.argmax(-1) == batch.label).float().mean()
    assert not out.metrics["loss"].requires_grad and out.loss.requires_grad


def test_missing_label_field_is_a_clear_error():
    task = ClassificationTask(C)
    with pytest.raises(MissingKeyError, match=r"no field 'cls' \(it has: txt.*fields=\('cls',\)"):
        task.training_step(_Model(None), _batch(None, n=4, txt=["a"] * 4))


def test_report_writes_the_confusion_matrix(tmp_path):
    names = [f"class-{i}" for i in range(C)]
    task = ClassificationTask(C, class_names=names)
    metrics = task.new_metrics(torch.device("cpu"))
    logits, labels = _logits_and_labels(1, n=100)
    metrics.update(logits, _batch(labels))
    [(title, body)] = metrics.report(tmp_path, "test")
    assert title == "Confusion matrix (test)" and "confusion_test.png" in body
    stored = json.loads((tmp_path / "confusion_test.json").read_text())
    assert stored["class_names"] == names and np.array(stored["confusion"]).sum() == 100
    assert (tmp_path / "confusion_test.png").read_bytes()[:4] == b"\x89PNG"
    rows = [line for line in body.splitlines() if line.startswith("| class-")]
    assert len(rows) == C - 1, "a class with no samples gets no recall row"
    recall = metrics.per_class_recall()
    assert f"| class-0 | {int((labels == 0).sum())} | {recall[0]:.3f} |" in body


def test_registry_head_and_options():
    assert "classification" in list_tasks() and "classifier" in list_heads()
    task = create_task("classification", num_classes=4, label_smoothing=0.2)
    assert isinstance(task, Task) and task.name == "classification" and task.fields == ("cls",)
    head = task.build_head(16, pool="mean")
    assert isinstance(head, ClassifierHead) and head.num_classes == 4 and head.pool == "mean"
    assert head(Tokens(torch.randn(2, 5, 16))).shape == (2, 4)
    with pytest.raises(RegistryArgumentError, match=r"task 'classification' takes no option 'label_smoothin'.*"):
        create_task("classification", num_classes=4, label_smoothin=0.2)
    with pytest.raises(RegistryError, match=r"unknown task 'clasification'.*did you mean 'classification'"):
        create_task("clasification")
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationTask(4, label_smoothing=1.5)
    assert task.better(0.5, None) and task.better(0.5, 0.5) and not task.better(0.4, 0.5)
