"""Small real classification datasets built offline from data that ships inside installed packages.

* ``digits``: scikit-learn's `load_digits` (1797 real 8x8 handwritten digits, 10 classes), stratified
  train/val/test split;
* ``textures``: crops of 17 photographs bundled with scikit-image, class = source photograph, with train, val and
  test crops taken from disjoint pixel regions of each photograph;
* ``meshes`` (points, `mmblocks.data.meshes`): point clouds sampled from pybullet's bundled meshes, 12 shape
  categories;
* ``keywords`` (audio, `mmblocks.data.keywords`): 20 spoken keywords synthesised with espeak-ng, test voices unseen
  in training;
* ``moving-digits`` (video, `mmblocks.data.moving_digits`): a digit moving in one of 8 directions, class =
  direction.

``mmblocks shards make digits|textures|meshes|keywords|moving-digits --out DIR`` calls `make_dataset`
(`mmblocks.data.registry`). Nothing is
downloaded: the skimage photographs that download on first use (brain, cells3d, skin, lily, kidney, eagle) are refused.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .registry import register_dataset
from .shards import write_shards

__all__ = [
    "DOWNLOADING_PHOTOS",
    "TEXTURE_PHOTOS",
    "digits_splits",
    "make_digits",
    "make_textures",
    "texture_splits",
]

SPLITS = ("train", "val", "test")

#: The default photographs of `textures` (17 classes). Left out: ``cat`` (the same photo as ``chelsea``), ``horse``
#: (a binary silhouette: most crops are uniform) and ``microaneurysms`` (102x102 px, too small for three disjoint
#: regions of 64 px cells).
TEXTURE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
#: skimage.data images fetched from the network on first use: never used here.
DOWNLOADING_PHOTOS = frozenset({"brain", "cells3d", "skin", "lily", "kidney", "eagle"})


def _fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1: {fractions}")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _encode(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    if fmt == "png":
        return _png(array)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ digits


def digits_splits(seed: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> dict[str, np.ndarray]:
    """Indices into `load_digits()` per split: stratified by class, deterministic given `seed`.

    With the default fractions: 1257 train, 270 val, 270 test (every class in every split, class proportions kept to
    within one sample).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _, f_val, f_test = _fractions(fractions)
    y = load_digits().target
    idx = np.arange(len(y))
    n_test, n_val = round(f_test * len(y)), round(f_val * len(y))
    rest, test = (
        (idx, idx[:0]) if n_test == 0 else train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    )
    train, val = (
        (rest, rest[:0])
        if n_val == 0
        else train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=seed + 1)
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


@register_dataset("digits")
def make_digits(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    max_count: int = 500,
    max_bytes: int | str = 1_000_000_000,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write scikit-learn's digits as ``train``/``val``/``test`` shards in `out`.

    Each sample: ``png`` an 8x8 grayscale PNG (values 0..16 scaled to 0..255 with rounding), ``cls`` the digit,
    ``json`` ``{"index": i}`` (the row in `load_digits()`); key ``digits-{i:04d}``. The split is stratified and
    fixed by `seed` (`digits_splits`); samples are shuffled by `seed` within a split. Returns the index contents.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    splits = digits_splits(seed, fractions)
    description = {
        "name": "digits",
        "source": "sklearn.datasets.load_digits (1797 8x8 images, values 0..16 scaled to 0..255)",
        "seed": seed,
        "fractions": dict(zip(SPLITS, _fractions(fractions))),
        "stratified": True,
    }
    command = command or f"mmblocks shards make digits --out {out} --seed {seed}"
    result: dict[str, Any] = {}
    for split in SPLITS:
        order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(splits[split])
        if len(order) == 0:
            continue
        samples = (
            {
                "__key__": f"digits-{i:04d}",
                "png": _png(pixels[i]),
                "cls": int(digits.target[i]),
                "json": {"index": int(i)},
            }
            for i in order
        )
        result = write_shards(
            samples,
            out,
            split,
            max_count=max_count,
            max_bytes=max_bytes,
            class_names=[str(c) for c in range(10)],
            command=command,
            dataset=description,
            total=len(order),
            progress=progress,
            overwrite=True,  # make_dataset refused an existing dataset unless asked to replace it
        )
    return result


# ---------------------------------------------------------------------------------------------------- textures


def _load_photo(name: str) -> np.ndarray:
    """A skimage photograph as uint8 RGB [H, W, 3] (grayscale stacked, binary scaled, alpha dropped)."""
    if name in DOWNLOADING_PHOTOS:
        raise ValueError(f"skimage.data.{name} downloads on first use; it is not allowed offline")
    from skimage import data

    loader = getattr(data, name, None)
    if loader is None or not callable(loader):
        raise ValueError(f"skimage.data has no photograph {name!r} (defaults: {', '.join(TEXTURE_PHOTOS)})")
    img = np.asarray(loader())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = np.clip(img.astype(np.float64) / max(float(img.max()), 1e-12) * 255.0, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"skimage.data.{name} is not a 2-D photograph (shape {img.shape})")
    return np.ascontiguousarray(img[:, :, :3])


def _grid(height: int, width: int, cell: int) -> list[tuple[int, int, int, int]]:
    """Cells ``(x0, y0, x1, y1)`` of a rows x cols grid that covers the image; every cell is >= `cell` px a side."""
    rows, cols = height // cell, width // cell
    ys = np.linspace(0, height, rows + 1).round().astype(int)
    xs = np.linspace(0, width, cols + 1).round().astype(int)
    return [(int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1])) for r in range(rows) for c in range(cols)]


def texture_splits(
    photos: Sequence[str] = TEXTURE_PHOTOS,
    *,
    seed: int = 0,
    crops_per_class: Sequence[int] = (320, 64, 64),
    size: int = 32,
    cell: int = 64,
    min_side: int = 32,
    max_side: int = 64,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    min_std: float = 4.0,
    fmt: str = "png",
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The samples of `make_textures` per split (unshuffled) and the ``regions`` description for ``index.json``.

    Region scheme: each photograph is cut into a grid of cells at least `cell` px a side (rows = H // cell,
    cols = W // cell, boundaries spread evenly). The cells are permuted with a per-photo RNG seeded by
    ``(seed, photo index)``; the first ``round(test * n)`` go to ``test``, the next ``round(val * n)`` to ``val``,
    the rest to ``train`` (at least one cell each). A crop is a square of side ``min_side..min(max_side, cell
    size)`` px at a uniform position inside one cell of its split (cells drawn in proportion to their area), so it
    never crosses a cell boundary: train, val and test crops of a photograph share no pixel. A crop whose pixel std
    is below `min_std` (flat sky, black borders) is redrawn up to 20 times. Crops are resized to `size` x `size`
    (PIL bicubic, antialiased) and encoded as `fmt` (``png`` or ``jpg``).

    Each sample's ``json``: ``{"source": photo, "split": split, "box": [x0, y0, x1, y1], "cell": [x0, y0, x1, y1]}``
    (pixel coordinates in the source photograph, ``x1``/``y1`` exclusive). ``regions["photos"][photo]`` holds the
    grid: cell boundaries ``xs``/``ys`` and ``grid``, one string per row with the split index (0 train, 1 val,
    2 test) of each cell.
    """
    from PIL import Image

    photos = list(photos)
    if len(set(photos)) != len(photos) or {"cat", "chelsea"} <= set(photos):
        raise ValueError(f"photos must be distinct photographs (note: skimage's cat is chelsea): {photos}")
    if fmt not in ("png", "jpg"):
        raise ValueError(f"fmt must be 'png' or 'jpg', got {fmt!r}")
    if not 1 <= min_side <= max_side <= cell:
        raise ValueError(f"need 1 <= min_side <= max_side <= cell (got {min_side}, {max_side}, {cell})")
    fracs = dict(zip(SPLITS, _fractions(fractions)))
    counts = dict(zip(SPLITS, (int(c) for c in crops_per_class)))
    samples: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    regions: dict[str, Any] = {
        "scheme": "grid cells assigned to splits; crops stay inside one cell",
        "grid_legend": "photos[name].grid[row][col] = index into splits; cell (row, col) = [xs[col], ys[row], "
        "xs[col + 1], ys[row + 1]]",
        "splits": list(SPLITS),
        "box_format": "xyxy (x1, y1 exclusive), source-photo pixels",
        "cell": cell,
        "min_side": min_side,
        "max_side": max_side,
        "fractions": fracs,
        "photos": {},
    }
    for label, name in enumerate(photos):
        img = _load_photo(name)
        height, width = img.shape[:2]
        cells = _grid(height, width, cell)
        if len(cells) < 3:
            raise ValueError(f"{name} ({width}x{height}) is too small for 3 regions of {cell} px cells")
        rng = np.random.default_rng([seed, label])
        perm = [int(i) for i in rng.permutation(len(cells))]
        n_test = max(1, round(fracs["test"] * len(cells))) if counts["test"] else 0
        n_val = max(1, round(fracs["val"] * len(cells))) if counts["val"] else 0
        if n_test + n_val >= len(cells):
            raise ValueError(f"{name}: {len(cells)} cells leave none for train; use a smaller cell")
        assigned = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
        xs = sorted({c[0] for c in cells} | {c[2] for c in cells})
        ys = sorted({c[1] for c in cells} | {c[3] for c in cells})
        where = {i: SPLITS.index(s) for s in SPLITS for i in assigned[s]}
        regions["photos"][name] = {
            "label": label,
            "shape": [height, width],
            "xs": xs,
            "ys": ys,
            "grid": [
                "".join(str(where[r * (len(xs) - 1) + c]) for c in range(len(xs) - 1)) for r in range(len(ys) - 1)
            ],
        }
        for split in SPLITS:
            boxes = [cells[i] for i in assigned[split]]
            if not boxes:
                continue
            areas = np.array([(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes], dtype=np.float64)
            for j in range(counts[split]):
                for _attempt in range(20):
                    x0c, y0c, x1c, y1c = boxes[int(rng.choice(len(boxes), p=areas / areas.sum()))]
                    side = int(rng.integers(min_side, min(max_side, x1c - x0c, y1c - y0c) + 1))
                    x0 = int(rng.integers(x0c, x1c - side + 1))
                    y0 = int(rng.integers(y0c, y1c - side + 1))
                    crop = img[y0 : y0 + side, x0 : x0 + side]
                    if crop.std() >= min_std:
                        break
                pil = Image.fromarray(crop)
                if side != size:
                    pil = pil.resize((size, size), Image.Resampling.BICUBIC)
                samples[split].append(
                    {
                        "__key__": f"{name}-{split}-{j:05d}",
                        fmt: _encode(np.asarray(pil), fmt),
                        "cls": label,
                        "json": {
                            "source": name,
                            "split": split,
                            "box": [x0, y0, x0 + side, y0 + side],
                            "cell": [x0c, y0c, x1c, y1c],
                        },
                    }
                )
    return samples, regions


@register_dataset("textures")
def make_textures(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    photos: Sequence[str] | None = None,
    crops_per_class: Sequence[int] = (320, 64, 64),
    size: int = 32,
    cell: int = 64,
    min_side: int = 32,
    max_side: int = 64,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    fmt: str = "png",
    max_count: int = 1000,
    max_bytes: int | str = 1_000_000_000,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the ``textures`` dataset: `size` x `size` RGB crops of skimage photographs, class = photograph.

    Defaults: 17 photographs (`TEXTURE_PHOTOS`), 320/64/64 crops per class for train/val/test (7616 crops,
    ~20 MB, a few seconds on 2 cores), 32x32 PNG. Train, val and test crops come from disjoint pixel regions of each
    photograph; the scheme is in `texture_splits` and the cells per photo and split are recorded in
    ``index.json["dataset"]["regions"]``, the crop box in each sample's ``json``. Deterministic given `seed`.
    Returns the index contents.
    """
    photos = list(photos) if photos is not None else list(TEXTURE_PHOTOS)
    samples, regions = texture_splits(
        photos,
        seed=seed,
        crops_per_class=crops_per_class,
        size=size,
        cell=cell,
        min_side=min_side,
        max_side=max_side,
        fractions=fractions,
        fmt=fmt,
    )
    description = {
        "name": "textures",
        "source": "skimage.data photographs (bundled with scikit-image)",
        "seed": seed,
        "size": size,
        "format": fmt,
        "crops_per_class": dict(zip(SPLITS, (int(c) for c in crops_per_class))),
        "regions": regions,
    }
    command = command or f"mmblocks shards make textures --out {out} --seed {seed}"
    result: dict[str, Any] = {}
    for split in SPLITS:
        items = samples[split]
        if not items:
            continue
        order = np.random.default_rng([seed, 1000 + SPLITS.index(split)]).permutation(len(items))
        result = write_shards(
            (items[i] for i in order),
            out,
            split,
            max_count=max_count,
            max_bytes=max_bytes,
            class_names=photos,
            command=command,
            dataset=description,
            total=len(items),
            progress=progress,
            overwrite=True,  # make_dataset refused an existing dataset unless asked to replace it
        )
    return result
