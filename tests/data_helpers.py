"""Tiny shard sets for the data tests: distinct real PNGs, written in milliseconds."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmblocks.data import write_shards


def png_bytes(seed: int, size: int = 8, mode: str = "RGB") -> bytes:
    """A small PNG whose pixels depend on `seed`."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def tiny_samples(n: int, *, num_classes: int = 3, prefix: str = "s", size: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "__key__": f"{prefix}{i:04d}",
            "png": png_bytes(i, size),
            "cls": i % num_classes,
            "txt": f"caption {i}",
            "json": {"i": i},
        }
        for i in range(n)
    ]


def write_tiny(
    out: Path, n: int, num_shards: int, *, split: str = "train", num_classes: int = 3, samples=None
) -> dict[str, Any]:
    """`n` samples in exactly `num_shards` shards (the last one may be shorter)."""
    samples = tiny_samples(n, num_classes=num_classes, prefix=f"{split}-") if samples is None else samples
    index = write_shards(
        samples,
        out,
        split,
        max_count=math.ceil(n / num_shards),
        class_names=[f"c{i}" for i in range(num_classes)],
        progress=False,
    )
    assert len(index["splits"][split]["shards"]) == num_shards
    return index


def all_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch.key]


def short_run(root: Path | str, out: Path | str, steps: int = 2, batch_size: int = 4) -> list[str]:
    """Config overrides that train a recipe `steps` steps on the shards in `root` into `out`, quietly."""
    return [
        f"data.root={root}",
        f"train.out_dir={out}",
        "train.epochs=1",
        f"train.max_steps={steps}",
        "train.warmup_steps=1",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        "train.progress=false",
        "train.tensorboard=false",
        "train.log_every=1",
    ]
