"""Zero-shot hot paths against CLIP_benchmark, measured in the same run (medians of interleaved repeats).

1. Classifier weights: `mmblocks.eval.zero_shot_classifier` (prompts of several classes per text batch) vs
   CLIP_benchmark's `zero_shot_classifier` (one text batch per class), `--classes` classes x `--templates` templates,
   through the real all-MiniLM-L6-v2 tower (`mmblocks.models.MiniLMTower`). Check: equal weights (1e-5).
2. Retrieval recall@{1,5,10}: `mmblocks.eval.retrieval_metrics` (each query's top k) vs CLIP_benchmark's
   `recall_at_k` + `batchify` (a [batch, k, items] one-hot per batch of queries), on random unit embeddings of
   `--items` items with `--captions` captions each. Check: equal metrics.

Usage: python bench/bench_zeroshot.py [--classes 100] [--templates 8] [--items 2000] [--captions 5] [--repeats 3]
       [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_classification as zsc
from clip_benchmark.metrics import zeroshot_retrieval as zsr

from mmblocks.eval import retrieval_metrics, zero_shot_classifier
from mmblocks.models import MiniLMTower


class _TowerAsCLIP:
    """The text tower behind open_clip's ``encode_text``, as both implementations call it."""

    def __init__(self, tower: MiniLMTower):
        self.tower = tower

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tower(ids)


def _clip_benchmark_recall(scores: torch.Tensor, positive: torch.Tensor, ks, batch_size: int) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (
            (zsr.batchify(zsr.recall_at_k, scores, positive, batch_size, "cpu", k=k) > 0).float().mean().item()
        )
        out[f"text_retrieval_recall@{k}"] = (
            (zsr.batchify(zsr.recall_at_k, scores.T, positive.T, batch_size, "cpu", k=k) > 0).float().mean().item()
        )
    return out


def _time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--templates", type=int, default=8)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="CLIP_benchmark's query batch (its loader batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tower = MiniLMTower()
    model = _TowerAsCLIP(tower)
    names = [f"object number {i}" for i in range(args.classes)]
    templates = [f"template {j}: a picture of a {{c}}." for j in range(args.templates)]
    ours_t, ref_t = [], []
    for _ in range(args.repeats):  # interleaved
        t, ours_w = _time(lambda: zero_shot_classifier(model, tower.tokenize, names, templates, batch_size=256), 1)
        ours_t.append(t)
        t, ref_w = _time(lambda: zsc.zero_shot_classifier(model, tower.tokenize, names, templates, "cpu", False), 1)
        ref_t.append(t)
    torch.testing.assert_close(ours_w, ref_w, rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    items = F.normalize(torch.randn(args.items, 256, generator=g), dim=-1)
    owner = torch.arange(args.items).repeat_interleave(args.captions)
    texts = F.normalize(items[owner] + 1.2 * torch.randn(len(owner), 256, generator=g), dim=-1)
    ks = (1, 5, 10)
    ours_r, ref_r = [], []
    for _ in range(args.repeats):
        t, ours_m = _time(lambda: retrieval_metrics(items, texts, owner, ks), 1)
        ours_r.append(t)

        def reference():
            scores = texts @ items.T
            positive = torch.zeros_like(scores, dtype=torch.bool)
            positive[torch.arange(len(scores)), owner] = True
            return _clip_benchmark_recall(scores, positive, ks, args.batch)

        t, ref_m = _time(reference, 1)
        ref_r.append(t)
    assert all(abs(ours_m[k] - ref_m[k]) < 1e-9 for k in ref_m), (ours_m, ref_m)

    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}; medians of {args.repeats} repeats")
    print(f"{'what':<58} {'CLIP_benchmark s':>17} {'ours s':>8} {'speed-up':>9}")
    rows = [
        (f"classifier, {args.classes} classes x {args.templates} templates, MiniLM-L6", ref_t, ours_t),
        (f"retrieval R@1/5/10, {args.items} items x {args.captions} captions", ref_r, ours_r),
    ]
    for what, ref, ours in rows:
        r, o = statistics.median(ref), statistics.median(ours)
        print(f"{what:<58} {r:>17.3f} {o:>8.3f} {r / o:>8.2f}x")
    print("checks: equal classifier weights (1e-5); equal recall@k")


if __name__ == "__main__":
    main()
