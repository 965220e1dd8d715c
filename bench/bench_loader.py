"""Throughput of `build_loader` against the decode bound: the same PNGs decoded in a plain Python loop.

The bound: the PNG bytes of the split are read into memory first, then each of `--workers` processes runs
``PIL.Image.open -> convert("RGB") -> the loader's own transform`` over its share in a plain loop (torch on one
thread, as in a DataLoader worker); bound = images / the slowest process's loop time. The loader reads the same
shards (tar parsing, shuffle buffer, decode handler, transform, collation, worker -> main transfer) with the same
number of workers; its rate is images / wall time of a whole epoch, worker start-up included. The two are measured
alternately, best of `--epochs` runs each (the 2-core CI machines are shared and noisy). Goal: >= 0.9x.

Datasets (built offline in a temp folder): ``textures`` (the default 32x32 PNG crops, 5440 train images) and
``textures128`` (128x128 PNG crops of the same photographs, resized to 112).
Usage: python bench/bench_loader.py [--workers 2] [--epochs 3] [--batch-size 64] [--only textures]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

from mmblocks.data import build_loader, build_transform, make_dataset, read_index

DATASETS = {
    # name: (make_dataset kwargs, image_size)
    "textures": ({}, 32),
    "textures128": (dict(size=128, cell=128, min_side=96, max_side=128, crops_per_class=(100, 4, 4)), 112),
}


def _png_bytes(root: Path) -> list[bytes]:
    index = read_index(root)
    urls = [str(root / s.name) for s in index.splits["train"].shards]
    return [s["png"] for s in wds.WebDataset(urls, shardshuffle=False)]


def _decode_loop(args: tuple[list[bytes], int, bool]) -> float:
    """Seconds for the plain loop over `data` (run in a worker process)."""
    from PIL import Image

    data, image_size, train = args
    torch.set_num_threads(1)
    transform = build_transform(image_size, train=train)
    t0 = time.perf_counter()
    for raw in data:
        with Image.open(io.BytesIO(raw)) as img:
            transform(img.convert("RGB"))
    return time.perf_counter() - t0


def decode_bound(pool, data: list[bytes], image_size: int, train: bool, workers: int) -> tuple[float, float]:
    """(images/s of `workers` processes in parallel, images/s of one process)."""
    chunks = [data[i::workers] for i in range(workers)]
    times = pool.map(_decode_loop, [(c, image_size, train) for c in chunks])
    single = pool.map(_decode_loop, [(data, image_size, train)])[0]
    return len(data) / max(times), len(data) / single


def loader_epoch(loader, epoch: int) -> float:
    """images/s of one whole epoch, worker start-up included."""
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    n = sum(len(batch.key) for batch in loader)
    rate = n / (time.perf_counter() - t0)
    assert n == loader.num_samples and loader.stats["lost"] == 0
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="repeats (loader epochs and bound runs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--only", choices=sorted(DATASETS), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {args.workers} workers, batch {args.batch_size}, best of {args.epochs} runs each"
    )
    header = f"{'dataset':<12} {'transform':<10} {'images':>6} {'loader/s':>9} {'bound/s':>9} {'1-proc/s':>9} ratio"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kwargs, image_size) in DATASETS.items():
            if args.only and name != args.only:
                continue
            root = Path(tmp) / name
            make_dataset("textures", root, progress=False, **kwargs)
            data = _png_bytes(root)
            for train in (False, True):
                loader = build_loader(
                    root,
                    "train",
                    batch_size=args.batch_size,
                    image_size=image_size,
                    num_workers=args.workers,
                    augment=None if train else "none",
                )
                bounds, singles, rates = [], [], []
                with mp.get_context("fork").Pool(args.workers) as pool:
                    for epoch in range(args.epochs):  # interleaved, so that both see the same machine load
                        bound, single = decode_bound(pool, data, image_size, train, args.workers)
                        bounds.append(bound)
                        singles.append(single)
                        rates.append(loader_epoch(loader, epoch))
                best, bound = max(rates), max(bounds)
                print(
                    f"{name:<12} {'train-aug' if train else 'eval':<10} {len(data):>6} {best:>9.0f} {bound:>9.0f} "
                    f"{max(singles):>9.0f} {best / bound:.2f}x   (median of {args.epochs}: "
                    f"{statistics.median(rates):.0f} vs {statistics.median(bounds):.0f}, "
                    f"{statistics.median(rates) / statistics.median(bounds):.2f}x)"
                )


if __name__ == "__main__":
    main()
