"""Contrastive training hot paths against their references, measured in the same run (medians of interleaved repeats).

1. A LiT training step (forward + backward of `ContrastiveTask.training_step`): a ViT-Tiny-width image encoder
   (4 blocks, 64 tokens) against the locked all-MiniLM-L6-v2 tower with its outputs cached once per distinct prompt,
   vs the same step running the tower on every sample's prompt (``cache_text: false``, what open_clip's training loop
   does with a locked tower). Check: equal loss.
2. The open_clip text tower on short prompts: `OpenCLIPTextTower` (the columns after the longest prompt cut, causal
   attention and end-of-text pooling make them dead) vs open_clip's own ``encode_text`` over the full 77-token context,
   ViT-S-32-alt's text transformer (random weights: none install offline). Check: equal features (1e-5).

Usage: python bench/bench_contrastive.py [--batch 64] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmblocks.builders import build_encoder, build_task
from mmblocks.config import load_config
from mmblocks.data.loader import Batch
from mmblocks.models import create_text_tower
from mmblocks.tasks import ContrastiveTask

CLASSES = [f"object number {i}" for i in range(20)]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "{c}"]


def _time(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(
        {
            "task": {"name": "contrastive", "text": "class", "classnames": CLASSES, "templates": TEMPLATES},
            "model": {
                "backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4},
                "text_tower": {"name": "minilm"},
                "head": {"name": "contrastive", "embed_dim": 256},
            },
            "data": {"image_size": 32, "root": "/nonexistent"},
        }
    )
    torch.manual_seed(0)
    cached = build_task(cfg)
    encoder = build_encoder(cfg, task=cached, verbose=False).train()
    uncached = ContrastiveTask(text="class", classnames=CLASSES, templates=TEMPLATES, cache_text=False)
    g = torch.Generator().manual_seed(1)
    batch = Batch(
        torch.randn(args.batch, 3, 32, 32, generator=g),
        torch.randint(0, len(CLASSES), (args.batch,), generator=g),
        [str(i) for i in range(args.batch)],
    )

    def step(task: ContrastiveTask) -> float:
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the same template draws in both
        out = task.training_step(encoder, batch)
        out.loss.backward()
        return out.loss.item()

    step(cached)  # fills the cache: the cost LiT pays once
    lit, ref = [], []
    for _ in range(args.repeats):
        t, loss_cached = _time(lambda: step(cached), 1)
        lit += t
        t, loss_uncached = _time(lambda: step(uncached), 1)
        ref += t
    assert abs(loss_cached - loss_uncached) < 1e-5, (loss_cached, loss_uncached)

    tower = create_text_tower("open_clip", model="ViT-S-32-alt", tune="frozen")
    prompts = [t.format(c=c) for c in CLASSES for t in TEMPLATES][: args.batch]
    ids = tower.tokenize(prompts)
    trimmed, full = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            t, ours = _time(lambda: tower(ids), 1)
            trimmed += t
            t, theirs = _time(lambda: tower.clip.encode_text(ids), 1)
            full += t
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}; medians of {args.repeats} repeats")
    print(f"{'what':<66} {'reference s':>12} {'ours s':>8} {'speed-up':>9}")
    longest = int((ids != 0).sum(1).max())
    rows = [
        (f"LiT step, batch {args.batch}, MiniLM-L6 cached vs run every step", ref, lit),
        (f"open_clip text tower, {len(prompts)} prompts of <= {longest} of 77 tokens", full, trimmed),
    ]
    for what, r, o in rows:
        r, o = statistics.median(r), statistics.median(o)
        print(f"{what:<66} {r:>12.4f} {o:>8.4f} {r / o:>8.2f}x")
    print("checks: equal LiT loss (1e-5); equal text features (1e-5)")


if __name__ == "__main__":
    main()
