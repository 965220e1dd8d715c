"""``meshes``: a small real point-cloud classification set sampled offline from the meshes bundled with pybullet.

``mmblocks shards make meshes --out DIR`` calls `make_meshes`. The meshes are the ``.obj`` / ``.stl`` files of
``pybullet_data`` (a pip wheel; nothing is downloaded); 12 categories of visually distinct shapes
(`MESH_CATEGORIES`): box, bunny, cone, cylinder, duck, lego brick, mug, sphere, teddy, torus, tray, wheel.

Split policy (recorded per category in ``index.json["dataset"]["categories"]`` and per sample in its ``json``):

* a category with at least 3 readable mesh instances (box: 5, tray: 3, wheel: 3) is split **by instance**: its
  last instance is the ``test`` mesh, the one before it the ``val`` mesh, the others are ``train`` meshes; test
  (and val) clouds come from meshes never seen in training;
* a category with fewer instances (the other 9; sphere has 2) is split **by augmentation draw**: every split
  samples the same mesh(es), but each sample's augmentation and surface sample come from its own random stream
  ``np.random.default_rng([seed, label, split, j])``, so no test cloud shares a draw (rotation, scale, jitter,
  surface points) with a training cloud. These classes test generalisation over pose, proportions and sampling,
  not over shapes.

Augmentation, drawn at make time for every sample:

1. the mesh is centred (bounding-box centre) and scaled into the unit sphere;
2. anisotropic scale: each axis by a factor log-uniform in `scale_range` (default 0.8..1.25);
3. `points` surface points sampled uniformly by area (`trimesh.sample.sample_surface`, seeded) from the scaled mesh,
   so every sample has different surface points;
4. a uniformly random rotation in SO(3) (full 3-D rotation: the bundled meshes have no common up axis, so an
   up-axis-only rotation would let orientation leak the class);
5. normalisation (centroid at the origin, farthest point at radius 1), Gaussian jitter (sigma `jitter`, clipped at
   `jitter_clip`), then normalised again: every stored cloud has mean 0 and max norm 1.

Each sample: ``npy`` float32 ``[P, 3]`` (P = `points`, default 1024), ``cls`` the category index (sorted category
names), ``json`` ``{"mesh", "category", "split_by", "instance", "seed", "rotation" (quaternion w, x, y, z),
"scale" [sx, sy, sz], "jitter", "sample_seed"}``. Unreadable or empty meshes are skipped with a log line (and a
category left without a mesh is dropped). Deterministic given `seed`: the same arrays, the same shard bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .registry import register_dataset
from .shards import ShardWriteError, write_shards

__all__ = ["MESH_CATEGORIES", "load_category_meshes", "make_meshes", "mesh_splits", "sample_cloud"]

logger = logging.getLogger("mmblocks.data")

SPLITS = ("train", "val", "test")

#: Category -> mesh files, relative to ``pybullet_data.getDataPath()``. With 3+ instances the last one is the test
#: mesh and the one before it the val mesh (instance-disjoint split); otherwise all splits use all meshes.
#: Left out: ``duck_vhacd.obj`` / ``objects/mug_col.obj`` (collision hulls of the duck and mug), ``urdf/mug.obj`` and
#: ``textured_sphere_smooth.obj`` (byte-identical geometry to ``objects/mug.obj`` / ``sphere_smooth.obj``), the
#: other three racecar wheels (copies of one wheel), robot links (no shape class) and ``random_urdfs/*`` (random
#: procedural objects, no categories).
MESH_CATEGORIES: dict[str, tuple[str, ...]] = {
    "box": ("cube.obj", "jenga/jenga.obj", "toys/cube.obj", "domino/domino.obj", "stone.obj"),
    "bunny": ("bunny.obj",),
    "cone": ("racecar/meshes/cone.obj",),
    "cylinder": ("toys/cylinder.obj",),
    "duck": ("duck.obj",),
    "lego": ("lego/lego.obj",),
    "mug": ("objects/mug.obj",),
    "sphere": ("sphere_smooth.obj", "soccerball.obj"),
    "teddy": ("teddy2_VHACD_CHs.obj",),
    "torus": ("torus/torus_textured.obj",),
    "tray": ("tray/tray_textured.obj", "tray/tray_textured2.obj", "tray/tray_textured4.obj"),
    "wheel": ("racecar/meshes/left_front_wheel.obj", "bicycle/files/wheel_scaled.stl", "husky/meshes/wheel.stl"),
}

#: A category needs this many readable instances to be split by instance (one each for val and test, 1+ for train).
MIN_INSTANCES_FOR_INSTANCE_SPLIT = 3


def _data_path() -> Path:
    try:
        import pybullet_data
    except ImportError as exn:  # pragma: no cover - pybullet is a dependency of this dataset
        raise ImportError("the meshes dataset needs pybullet's bundled meshes: pip install pybullet") from exn
    return Path(pybullet_data.getDataPath())


def _load_mesh(path: Path) -> Any | None:
    """The mesh at `path`, centred (bounding box) and scaled into the unit sphere; None (logged) if unreadable."""
    import trimesh

    try:
        mesh = trimesh.load(path, force="mesh", skip_materials=True)
    except Exception as exn:  # trimesh raises ValueError, KeyError, IndexError ... for a bad file
        logger.warning("meshes: skipped %s (unreadable: %s)", path, exn)
        return None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0 or not mesh.area > 0:
        logger.warning("meshes: skipped %s (no faces with area)", path)
        return None
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    vertices = vertices - (vertices.min(0) + vertices.max(0)) / 2
    radius = float(np.linalg.norm(vertices, axis=1).max())
    if not np.isfinite(radius) or radius <= 0:
        logger.warning("meshes: skipped %s (degenerate extent)", path)
        return None
    return trimesh.Trimesh(vertices / radius, np.asarray(mesh.faces), process=False)


def load_category_meshes(
    categories: Mapping[str, Sequence[str]] | None = None, root: str | os.PathLike | None = None
) -> dict[str, list[tuple[str, Any]]]:
    """Readable meshes per category: ``{category: [(path as given, normalised trimesh.Trimesh), ...]}``.

    Paths are relative to `root` (default ``pybullet_data.getDataPath()``) or absolute. Unreadable meshes are skipped
    with a log line; a category without any readable mesh is dropped (logged).
    """
    categories = MESH_CATEGORIES if categories is None else categories
    base = _data_path() if root is None else Path(root)
    loaded: dict[str, list[tuple[str, Any]]] = {}
    for name, paths in categories.items():
        meshes = []
        for ref in paths:
            path = Path(ref) if Path(ref).is_absolute() else base / ref
            mesh = _load_mesh(path)
            if mesh is not None:
                meshes.append((str(ref), mesh))
        if meshes:
            loaded[name] = meshes
        else:
            logger.warning("meshes: dropped category %r (no readable mesh among %s)", name, list(paths))
    return loaded


def mesh_splits(refs: Sequence[str]) -> tuple[str, dict[str, list[int]]]:
    """How one category's instances go to the splits: ``("instance", {...})`` with the last instance for test and
    the one before it for val when there are 3+, else ``("augmentation", {split: all instances})``."""
    n = len(refs)
    if n >= MIN_INSTANCES_FOR_INSTANCE_SPLIT:
        return "instance", {"train": list(range(n - 2)), "val": [n - 2], "test": [n - 1]}
    return "augmentation", {split: list(range(n)) for split in SPLITS}


def _random_rotation(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random rotation: (quaternion w, x, y, z with w >= 0, 3x3 matrix)."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    q = q if q[0] >= 0 else -q
    w, x, y, z = q
    matrix = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    return q, matrix


def _normalise(points: np.ndarray) -> np.ndarray:
    points = points - points.mean(0)
    return points / max(float(np.linalg.norm(points, axis=1).max()), 1e-12)


def sample_cloud(
    mesh: Any,
    rng: np.random.Generator,
    *,
    points: int = 1024,
    scale_range: tuple[float, float] = (0.8, 1.25),
    jitter: float = 0.01,
    jitter_clip: float = 0.05,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One augmented cloud ``[points, 3]`` float32 (mean 0, max norm 1) from a normalised mesh, and its parameters.

    Draw order from `rng`: per-axis log-uniform scale, surface-sample seed, rotation quaternion, jitter.
    """
    import trimesh

    lo, hi = scale_range
    scale = np.exp(rng.uniform(np.log(lo), np.log(hi), size=3))
    sample_seed = int(rng.integers(0, 2**31 - 1))
    quat, rotation = _random_rotation(rng)
    scaled = trimesh.Trimesh(np.asarray(mesh.vertices) * scale, np.asarray(mesh.faces), process=False)
    surface, _ = trimesh.sample.sample_surface(scaled, points, seed=sample_seed)
    cloud = _normalise(np.asarray(surface, dtype=np.float64) @ rotation.T)
    if jitter > 0:
        cloud = _normalise(cloud + np.clip(rng.normal(0.0, jitter, cloud.shape), -jitter_clip, jitter_clip))
    params = {
        "rotation": [round(float(v), 6) for v in quat],
        "scale": [round(float(v), 6) for v in scale],
        "jitter": jitter,
        "sample_seed": sample_seed,
    }
    return cloud.astype(np.float32), params


@register_dataset("meshes")
def make_meshes(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    categories: Mapping[str, Sequence[str]] | None = None,
    samples_per_class: Sequence[int] = (100, 20, 20),
    points: int = 1024,
    scale_range: Sequence[float] = (0.8, 1.25),
    jitter: float = 0.01,
    jitter_clip: float = 0.05,
    root: str | os.PathLike | None = None,
    max_count: int = 1000,
    max_bytes: int | str = 1_000_000_000,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the ``meshes`` point-cloud dataset (module docstring: split policy and augmentation) to `out`.

    Defaults: the 12 categories of `MESH_CATEGORIES`, 100/20/20 clouds per class for train/val/test (1680 clouds of
    1024 points, ~25 MB, ~3 s on 2 cores). Within a split, the clouds of a class cycle over the split's
    instances. `categories` maps names to mesh paths (relative to `root`, default ``pybullet_data``'s folder, or
    absolute); class ids follow the sorted names of the categories that have a readable mesh. Returns the index
    contents.
    """
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must be 0 < low <= high, got {tuple(scale_range)}")
    if len(samples_per_class) != 3 or any(int(c) < 0 for c in samples_per_class):
        raise ValueError(f"samples_per_class must be three non-negative counts (train, val, test): {samples_per_class}")
    counts = dict(zip(SPLITS, (int(c) for c in samples_per_class)))
    meshes = load_category_meshes(categories, root)
    if not meshes:
        raise ShardWriteError("meshes: no readable mesh in any category")
    names = sorted(meshes)
    policy = {name: mesh_splits([ref for ref, _ in meshes[name]]) for name in names}
    description = {
        "name": "meshes",
        "source": "pybullet_data meshes (pip wheel pybullet), surface-sampled with trimesh",
        "seed": seed,
        "points": points,
        "samples_per_class": counts,
        "normalisation": "centroid at the origin, max norm 1 (after jitter)",
        "augmentation": {
            "rotation": "uniform SO(3)",
            "scale": f"per axis, log-uniform in [{lo}, {hi}]",
            "jitter": f"N(0, {jitter}) clipped to +-{jitter_clip}",
            "surface_sample": "area-uniform, a new seed per sample",
        },
        "split_policy": "categories with >= 3 instances: instance-disjoint (last instance test, the one before val); "
        "others: the same meshes in every split, disjoint augmentation draws (rng [seed, label, split, j])",
        "categories": {
            name: {
                "split_by": policy[name][0],
                "meshes": {split: [meshes[name][i][0] for i in policy[name][1][split]] for split in SPLITS},
            }
            for name in names
        },
    }
    command = command or f"mmblocks shards make meshes --out {out} --seed {seed}"
    result: dict[str, Any] = {}
    for s, split in enumerate(SPLITS):
        if counts[split] == 0:
            continue
        jobs = [(label, j) for label in range(len(names)) for j in range(counts[split])]
        order = np.random.default_rng([seed, 1000 + s]).permutation(len(jobs))

        def samples(split: str = split, s: int = s, jobs: list = jobs, order: np.ndarray = order):
            for k in order:
                label, j = jobs[k]
                name = names[label]
                split_by, assigned = policy[name]
                instance = assigned[split][j % len(assigned[split])]
                ref, mesh = meshes[name][instance]
                draw = [seed, label, s, j]
                cloud, params = sample_cloud(
                    mesh,
                    np.random.default_rng(draw),
                    points=points,
                    scale_range=(lo, hi),
                    jitter=jitter,
                    jitter_clip=jitter_clip,
                )
                meta = {"mesh": ref, "category": name, "split_by": split_by, "instance": instance, "seed": draw}
                yield {"__key__": f"{name}-{split}-{j:05d}", "npy": cloud, "cls": label, "json": {**meta, **params}}

        result = write_shards(
            samples(),
            out,
            split,
            max_count=max_count,
            max_bytes=max_bytes,
            modality="points",
            class_names=names,
            command=command,
            dataset=description,
            total=len(jobs),
            progress=progress,
            overwrite=True,  # make_dataset refused an existing dataset unless asked to replace it
        )
    return result
