"""The ``meshes`` point-cloud dataset: split policy from the written shards, balance, shapes, determinism."""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mmblocks.cli import build_parser, main
from mmblocks.data import DATASETS, MESH_CATEGORIES, make_dataset, make_meshes, read_index
from mmblocks.data.meshes import _random_rotation, load_category_meshes, mesh_splits

SPLITS = ("train", "val", "test")
SMALL = dict(samples_per_class=(6, 3, 3), points=256, max_count=25, progress=False)


def _read(folder: Path, split: str) -> list[dict]:
    urls = [str(p) for p in sorted(folder.glob(f"{split}-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def meshes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meshes")
    make_dataset("meshes", out, seed=0, **SMALL)
    return out


def test_index_sizes_classes_and_policy(meshes):
    index = read_index(meshes)
    assert index.modality == "points"
    assert index.class_names == sorted(MESH_CATEGORIES) and len(index.class_names) >= 6
    assert {k: v.num_samples for k, v in index.splits.items()} == {"train": 72, "val": 36, "test": 36}
    assert len(index.splits["train"].shards) == 3  # max_count=25
    assert index.splits["test"].extensions == ["cls", "json", "npy"]
    described = index.dataset
    assert described["name"] == "meshes" and described["points"] == 256
    assert "instance" in described["split_policy"] and "augmentation" in described["split_policy"]
    policy = {name: c["split_by"] for name, c in described["categories"].items()}
    assert {n for n, p in policy.items() if p == "instance"} == {"box", "tray", "wheel"}
    assert described["categories"]["wheel"]["meshes"]["test"] == ["husky/meshes/wheel.stl"]


def test_split_disjoint_by_instance_or_draw(meshes):
    index = read_index(meshes)
    meshes_of = defaultdict(lambda: defaultdict(set))  # category -> split -> meshes
    draws = {split: set() for split in SPLITS}
    for split in SPLITS:
        for s in _read(meshes, split):
            meta = json.loads(s["json"])
            assert index.class_names[int(s["cls"])] == meta["category"]
            assert meta["mesh"] in index.dataset["categories"][meta["category"]]["meshes"][split]
            assert meta["seed"][2] == SPLITS.index(split)
            meshes_of[meta["category"]][split].add(meta["mesh"])
            draws[split].add((meta["mesh"], tuple(meta["seed"]), meta["sample_seed"], tuple(meta["rotation"])))
    for category, by_split in meshes_of.items():
        if index.dataset["categories"][category]["split_by"] == "instance":
            for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
                assert not by_split[a] & by_split[b], f"{category}: {a} and {b} share a mesh instance"
            assert len(by_split["train"]) == len(MESH_CATEGORIES[category]) - 2
        else:  # the same meshes everywhere, no augmentation draw shared
            assert by_split["train"] == by_split["test"] == by_split["val"]
    assert not draws["train"] & draws["test"] and not draws["train"] & draws["val"] and not draws["val"] & draws["test"]
    rotations = [d[3] for split in SPLITS for d in draws[split]]
    assert len(set(rotations)) == len(rotations)  # every sample its own rotation


def test_balanced_shapes_dtypes_normalised(meshes):
    for split, per_class in zip(SPLITS, (6, 3, 3)):
        samples = _read(meshes, split)
        labels = np.array([int(s["cls"]) for s in samples])
        assert np.array_equal(np.bincount(labels, minlength=12), np.full(12, per_class))
        for s in samples:
            cloud = np.load(io.BytesIO(s["npy"]), allow_pickle=False)
            assert cloud.dtype == np.float32 and cloud.shape == (256, 3)
            assert np.isfinite(cloud).all()
            np.testing.assert_allclose(cloud.mean(0), 0, atol=1e-5)
            np.testing.assert_allclose(np.linalg.norm(cloud, axis=1).max(), 1, atol=1e-5)
            meta = json.loads(s["json"])
            assert len(meta["scale"]) == 3 and all(0.8 <= v <= 1.25 for v in meta["scale"])
            assert abs(np.linalg.norm(meta["rotation"]) - 1) < 1e-4


def test_plain_webdataset_decode(meshes):
    urls = [str(p) for p in sorted(meshes.glob("test-*.tar"))]
    sample = next(iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()))
    assert isinstance(sample["npy"], np.ndarray) and sample["npy"].shape == (256, 3)
    assert isinstance(sample["cls"], int) and sample["json"]["category"] in MESH_CATEGORIES


def test_reproducible_from_seed(meshes, tmp_path):
    make_meshes(tmp_path / "a", seed=0, **SMALL)
    for path in sorted(meshes.glob("*.tar")):
        assert (tmp_path / "a" / path.name).read_bytes() == path.read_bytes(), path.name
    small = dict(SMALL, samples_per_class=(2, 0, 1))
    make_meshes(tmp_path / "b", seed=1, **small)
    make_meshes(tmp_path / "c", seed=0, **small)
    b, c = _read(tmp_path / "b", "test"), _read(tmp_path / "c", "test")
    assert [s["__key__"] for s in sorted(b, key=lambda s: s["__key__"])] == sorted(s["__key__"] for s in c)
    by_key = {s["__key__"]: s["npy"] for s in c}
    assert all(s["npy"] != by_key[s["__key__"]] for s in b)
    assert read_index(tmp_path / "c").splits.keys() == {"train", "test"}


def test_unreadable_meshes_are_skipped(tmp_path, caplog):
    bad = tmp_path / "bad.obj"
    bad.write_text("this is not a mesh\n")
    categories = {"box": ["cube.obj", str(bad)], "ghost": [str(tmp_path / "missing.obj")], "duck": ["duck.obj"]}
    with caplog.at_level(logging.WARNING, logger="mmblocks.data"):
        index = make_meshes(tmp_path / "out", categories=categories, **dict(SMALL, samples_per_class=(2, 1, 1)))
    assert index["class_names"] == ["box", "duck"]
    assert "skipped" in caplog.text and str(bad) in caplog.text and "dropped category 'ghost'" in caplog.text
    assert index["dataset"]["categories"]["box"] == {
        "split_by": "augmentation",
        "meshes": {split: ["cube.obj"] for split in SPLITS},
    }


def test_helpers():
    assert mesh_splits(["a", "b"]) == ("augmentation", {s: [0, 1] for s in SPLITS})
    assert mesh_splits(["a", "b", "c", "d"]) == ("instance", {"train": [0, 1], "val": [2], "test": [3]})
    rng = np.random.default_rng(0)
    for _ in range(5):
        q, r = _random_rotation(rng)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0) and q[0] >= 0
    loaded = load_category_meshes({"torus": ["torus/torus_textured.obj"]})
    vertices = np.asarray(loaded["torus"][0][1].vertices)
    assert np.linalg.norm(vertices, axis=1).max() == pytest.approx(1.0)


def test_cli_make_choices_match_registry(tmp_path, capsys):
    assert {"meshes", "keywords", "moving-digits"} <= set(DATASETS)
    for name in DATASETS:  # every registered maker is a `shards make` choice
        assert build_parser().parse_args(["shards", "make", name, "--out", "x"]).name == name
    argv = ["shards", "make", "meshes", "--out", str(tmp_path), "--seed", "2"]
    assert main([*argv, "--set", "samples_per_class=[3, 1, 2]", "--set", "points=128"]) == 0
    assert "wrote meshes" in capsys.readouterr().out
    index = read_index(tmp_path)
    assert {k: v.num_samples for k, v in index.splits.items()} == {"train": 36, "val": 12, "test": 24}
    assert index.command.startswith("mmblocks shards make meshes") and index.dataset["seed"] == 2
    assert index.modality == "points" and index.dataset["points"] == 128
    assert main([*argv, "--set", "no_such_option=1"]) == 2
    assert main([*argv, "--set", "points"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
