"""Zero-shot classification with any CLIP-like model, with CLIP_benchmark's definitions.

A *CLIP-like model* has open_clip's interface: ``encode_image(x)`` (any modality: the name is open_clip's) and
``encode_text(token_ids)``, each returning ``[B, D]`` features; a tokenizer maps a list of strings to ``[N, L]`` ids.
open_clip models and mmblocks contrastive runs both qualify.

* `zero_shot_classifier`: one weight vector per class, the mean of the L2-normalised embeddings of its prompts,
  renormalised (``[D, C]``). This equals ``clip_benchmark.metrics.zeroshot_classification.zero_shot_classifier`` and
  open_clip's ``build_zero_shot_classifier_legacy`` (which normalise each prompt before averaging); prompts of
  several classes go through the text tower together, ``batch_size`` at a time.
* `classify`: logits ``100 * normalize(encode_image(x)) @ W`` over a loader, and the targets.
* `classification_metrics`: ``acc1``, ``acc5`` (NaN below 5 classes) and ``mean_per_class_recall`` (scikit-learn's
  ``balanced_accuracy_score``), as CLIP_benchmark reports them.
* `evaluate_classification`: the three, end to end.
* `evaluate_retrieval` / `retrieval_metrics` (from `mmblocks.eval.retrieval`, re-exported here: the zero-shot API is
  one module).

Templates are a list of strings with ``{c}`` (CLIP_benchmark) or ``{}`` (open_clip) for the class name, or callables
``name -> prompt``, or a dict ``{class name: [prompts]}`` (CuPL-style class-specific prompts).
A loader yields ``(inputs, targets)`` pairs or mmblocks `Batch` objects (inputs, mask and extras go to
``encode_image``; targets are the ``cls`` field).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._device import autocast_if, to_device
from .retrieval import evaluate_retrieval, grouped_retrieval_metrics, retrieval_metrics

__all__ = [
    "classification_metrics",
    "classify",
    "evaluate_classification",
    "evaluate_retrieval",
    "fill_template",
    "grouped_retrieval_metrics",
    "retrieval_metrics",
    "zero_shot_classifier",
]

Templates = Sequence[str | Callable[[str], str]] | Mapping[str, Sequence[str]]


def fill_template(template: str | Callable[[str], str], classname: str) -> str:
    """``template`` with ``classname`` in its ``{c}`` or ``{}`` slot, or ``template(classname)`` for a callable."""
    if callable(template):
        return template(classname)
    if "{c}" in template:
        return template.format(c=classname)
    if "{}" in template:
        return template.format(classname)
    raise ValueError(f"template {template!r} has no '{{c}}' or '{{}}' slot for the class name")


def _prompts(classnames: Sequence[str], templates: Templates) -> list[list[str]]:
    if not classnames:
        raise ValueError("no class names: zero-shot classification needs at least one")
    if isinstance(templates, Mapping):
        missing = [c for c in classnames if not templates.get(c)]
        if missing:
            raise ValueError(f"class-specific templates have no prompts for {missing[:5]} ({len(missing)} classes)")
        return [list(templates[c]) for c in classnames]
    if isinstance(templates, str) or not templates:
        raise ValueError("templates must be a non-empty list of prompt templates (or a dict of per-class prompts)")
    return [[fill_template(t, c) for t in templates] for c in classnames]


@torch.no_grad()
def zero_shot_classifier(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Templates,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    amp: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Class weight vectors ``[D, C]``: per class, the mean of its prompts' L2-normalised text embeddings,
    renormalised. ``batch_size`` prompts (of any classes) are encoded per forward."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    per_class = _prompts(classnames, templates)
    flat = [p for prompts in per_class for p in prompts]
    chunks = []
    starts = range(0, len(flat), batch_size)
    for start in tqdm(starts, desc="class prompts", disable=not progress, total=len(starts)):
        ids = tokenizer(flat[start : start + batch_size]).to(device)
        with autocast_if(device, amp):
            chunks.append(F.normalize(model.encode_text(ids).float(), dim=-1))
    embeddings = torch.cat(chunks)
    weights, start = [], 0
    for prompts in per_class:
        mean = embeddings[start : start + len(prompts)].mean(dim=0)
        weights.append(mean / mean.norm())
        start += len(prompts)
    return torch.stack(weights, dim=1)


def _unpack(batch: Any) -> tuple[tuple, dict[str, Any], Any]:
    """``(args, kwargs, targets)`` of one loader item: an ``(inputs, targets)`` pair or an mmblocks `Batch`."""
    if hasattr(batch, "model_inputs"):
        args, kwargs = batch.model_inputs()
        return args, kwargs, batch.field("cls")
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return (batch[0],), {}, batch[1]
    raise TypeError(f"a zero-shot loader yields (inputs, targets) pairs or mmblocks Batch objects, got {type(batch)}")


@torch.no_grad()
def classify(
    model: Any,
    classifier: torch.Tensor,
    dataloader: Iterable[Any],
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, C], targets [N])`` over `dataloader`: ``100 * normalize(encode_image(x)) @ classifier``, the
    logit scale open_clip and CLIP_benchmark use for zero-shot."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    classifier = classifier.to(device)
    logits, targets = [], []
    for batch in tqdm(dataloader, desc="zero-shot", disable=not progress):
        args, kwargs, target = _unpack(batch)
        args = tuple(to_device(a, device) for a in args)
        kwargs = {k: to_device(v, device) for k, v in kwargs.items()}
        with autocast_if(device, amp):
            features = F.normalize(model.encode_image(*args, **kwargs).float(), dim=-1)
            logits.append((100.0 * features @ classifier.float()).float().cpu())
        targets.append(torch.as_tensor(target).cpu())
    if not logits:
        raise ValueError("the zero-shot loader yielded no batches")
    return torch.cat(logits), torch.cat(targets)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``acc1``, ``acc5`` (NaN with fewer than 5 classes) and ``mean_per_class_recall`` (the mean over the classes
    present in `targets` of their recall: scikit-learn's ``balanced_accuracy_score``), from logits ``[N, C]`` and
    integer targets ``[N]``."""
    from sklearn.metrics import balanced_accuracy_score

    if logits.ndim != 2 or targets.ndim != 1 or len(logits) != len(targets):
        got = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"expected logits [N, C] and targets [N], got {got}")
    if len(targets) == 0:
        raise ValueError("no samples to score")
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == targets[:, None]
    acc1 = hit[:, 0].float().mean().item()
    acc5 = hit[:, :5].any(dim=1).float().mean().item() if logits.shape[1] >= 5 else math.nan
    pred = logits.argmax(dim=1)
    return {
        "acc1": acc1,
        "acc5": acc5,
        "mean_per_class_recall": float(balanced_accuracy_score(targets.numpy(), pred.numpy())),
    }


def evaluate_classification(
    model: Any,
    dataloader: Iterable[Any],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Templates,
    device: str | torch.device = "cpu",
    amp: bool = False,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot classification of `dataloader` by prompt ensembles of `classnames`: ``acc1``, ``acc5``,
    ``mean_per_class_recall`` (CLIP_benchmark's ``zeroshot_classification.evaluate``)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device, batch_size, amp, progress)
        logits, targets = classify(model, classifier, dataloader, device, amp, progress)
    finally:
        if was_training:
            model.train()
    return classification_metrics(logits, targets)
