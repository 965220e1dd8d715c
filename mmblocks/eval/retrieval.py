"""Zero-shot retrieval with any CLIP-like model, with CLIP_benchmark's definitions (several captions per item).

* `retrieval_metrics`: from L2-normalised item embeddings ``[N, D]``, caption embeddings ``[T, D]`` and the item of
  each caption, ``image_retrieval_recall@k`` (a caption finds its item among the top k items) and
  ``text_retrieval_recall@k`` (an item finds at least one of its captions among the top k captions), each averaged
  over the queries, as ``clip_benchmark.metrics.zeroshot_retrieval.evaluate`` computes them. The name says
  "image" for any modality, as CLIP_benchmark's does. Only the top k of each query is kept, never a
  ``[T, k, N]`` one-hot, so a 100k-caption set fits in memory.
* `evaluate_retrieval`: embeds a loader (``(inputs, captions)`` pairs, captions a list of lists of strings, or
  mmblocks `Batch` objects whose ``txt`` field holds one caption per item, or ``json["captions"]`` several) and
  scores it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._device import autocast_if, to_device

__all__ = ["evaluate_retrieval", "grouped_retrieval_metrics", "retrieval_metrics"]


def _hits(scores: torch.Tensor, positive: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], k: int, rows: int):
    """Per query row of `scores` ``[Q, M]``: whether a positive is among its top k (``torch.topk``, as CLIP_benchmark
    ranks), computed `rows` queries at a time."""
    out = []
    for start in range(0, len(scores), rows):
        top = scores[start : start + rows].topk(k, dim=1).indices  # [q, k]
        out.append(positive(torch.arange(start, start + len(top)), top).any(dim=1))
    return torch.cat(out)


def retrieval_metrics(
    item_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_item: torch.Tensor | Sequence[int],
    recall_k: Sequence[int] = (1, 5, 10),
    rows: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways from L2-normalised embeddings; `text_item` ``[T]`` gives each caption's item index."""
    text_item = torch.as_tensor(text_item, dtype=torch.long)
    if item_embeddings.ndim != 2 or text_embeddings.ndim != 2 or item_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"expected item [N, D] and caption [T, D] embeddings, got {tuple(item_embeddings.shape)} and "
            f"{tuple(text_embeddings.shape)}"
        )
    n, t = len(item_embeddings), len(text_embeddings)
    if text_item.shape != (t,) or (t and (text_item.min() < 0 or text_item.max() >= n)):
        raise ValueError(f"text_item must give each of the {t} captions an item index in [0, {n}), got {text_item}")
    if t == 0 or n == 0:
        raise ValueError("retrieval needs at least one item and one caption")
    has_caption = torch.zeros(n, dtype=torch.bool)
    has_caption[text_item] = True
    if not has_caption.all():  # CLIP_benchmark would divide by zero positives there
        raise ValueError(f"{int((~has_caption).sum())} items have no caption; every item needs at least one")
    scores = text_embeddings.float() @ item_embeddings.float().T  # [T, N]
    metrics = {}
    for k in recall_k:
        if not 1 <= k <= min(n, t):
            raise ValueError(f"recall@{k} needs 1 <= k <= min(items, captions) = {min(n, t)}")
        # caption -> item: the caption's own item among its top k
        found_item = _hits(scores, lambda q, top: top == text_item[q, None], k, rows)
        # item -> caption: any caption of the item among its top k
        found_text = _hits(scores.T, lambda q, top: text_item[top] == q[:, None], k, rows)
        metrics[f"image_retrieval_recall@{k}"] = found_item.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = found_text.float().mean().item()
    return metrics


def _captions(batch: Any) -> tuple[tuple, dict[str, Any], list[list[str]]]:
    if hasattr(batch, "model_inputs"):
        args, kwargs = batch.model_inputs()
        fields = getattr(batch, "fields", {})
        if "txt" in fields:
            captions = [[c] for c in batch.field("txt")]
        elif "json" in fields:
            captions = [list(meta.get("captions") or []) for meta in batch.field("json")]
        else:
            batch.field("txt")  # raises, naming the fields the batch has
        return args, kwargs, captions
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return (batch[0],), {}, [[c] if isinstance(c, str) else list(c) for c in batch[1]]
    raise TypeError(f"a retrieval loader yields (inputs, captions) pairs or mmblocks Batch objects, got {type(batch)}")


@torch.no_grad()
def evaluate_retrieval(
    model: Any,
    dataloader: Iterable[Any],
    tokenizer: Callable[[list[str]], torch.Tensor],
    recall_k: Sequence[int] = (1, 5, 10),
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """``image_retrieval_recall@k`` and ``text_retrieval_recall@k`` over `dataloader` (CLIP_benchmark's
    ``zeroshot_retrieval.evaluate``, several captions per item)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    items, texts, text_item, seen = [], [], [], 0
    try:
        for batch in tqdm(dataloader, desc="retrieval", disable=not progress):
            args, kwargs, captions = _captions(batch)
            args = tuple(to_device(a, device) for a in args)
            kwargs = {k: to_device(v, device) for k, v in kwargs.items()}
            flat = [c for caps in captions for c in caps]
            with autocast_if(device, amp):
                items.append(F.normalize(model.encode_image(*args, **kwargs).float(), dim=-1).cpu())
                if flat:
                    ids = tokenizer(flat).to(device)
                    texts.append(F.normalize(model.encode_text(ids).float(), dim=-1).cpu())
            text_item += [seen + i for i, caps in enumerate(captions) for _ in caps]
            seen += len(captions)
    finally:
        if was_training:
            model.train()
    if not items:
        raise ValueError("the retrieval loader yielded no batches")
    if not texts:
        raise ValueError("the retrieval loader yielded no captions")
    return retrieval_metrics(torch.cat(items), torch.cat(texts), text_item, recall_k)


def grouped_retrieval_metrics(
    item_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    item_text: torch.Tensor | Sequence[int],
    recall_k: Sequence[int] = (1, 5, 10),
    rows: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways when several items share one text (a class prompt, a caption repeated across items):
    `item_text` ``[N]`` gives each item's text among the ``[T, D]`` `text_embeddings`. ``image_retrieval_recall@k``:
    a text finds one of its items among its top k items; ``text_retrieval_recall@k``: an item finds its text among
    the top k texts. These are CLIP_benchmark's ``recall_at_k`` with the positive pairs ``item_text[i] == t``."""
    item_text = torch.as_tensor(item_text, dtype=torch.long)
    n, t = len(item_embeddings), len(text_embeddings)
    if item_embeddings.ndim != 2 or text_embeddings.ndim != 2 or item_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"expected item [N, D] and text [T, D] embeddings, got {tuple(item_embeddings.shape)} and "
            f"{tuple(text_embeddings.shape)}"
        )
    if item_text.shape != (n,) or (n and (item_text.min() < 0 or item_text.max() >= t)):
        raise ValueError(f"item_text must give each of the {n} items a text index in [0, {t}), got {item_text}")
    if n == 0 or t == 0:
        raise ValueError("retrieval needs at least one item and one text")
    if len(set(item_text.tolist())) != t:
        raise ValueError("every text needs at least one item (drop the texts no item has)")
    scores = text_embeddings.float() @ item_embeddings.float().T  # [T, N]
    metrics = {}
    for k in recall_k:
        if not 1 <= k <= min(n, t):
            raise ValueError(f"recall@{k} needs 1 <= k <= min(items, texts) = {min(n, t)}")
        found_item = _hits(scores, lambda q, top: item_text[top] == q[:, None], k, rows)
        found_text = _hits(scores.T, lambda q, top: top == item_text[q, None], k, rows)
        metrics[f"image_retrieval_recall@{k}"] = found_item.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = found_text.float().mean().item()
    return metrics
