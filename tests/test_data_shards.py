"""Shard writers, index.json, folder/manifest writers and the offline datasets (design §6)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_helpers import png_bytes, tiny_samples, write_tiny
from PIL import Image

from mmblocks.data import (
    FORMAT_VERSION,
    TEXTURE_PHOTOS,
    ShardWriteError,
    build_loader,
    digits_splits,
    make_dataset,
    parse_size,
    read_index,
    texture_splits,
    write_from_folder,
    write_from_manifest,
    write_shards,
)
from mmblocks.data.tario import TarReadError, iter_samples


def _leftovers(folder: Path) -> list[str]:
    """Anything a writer should not leave behind: temp files, hidden files, lock files."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


# ------------------------------------------------------------------------------------------------ write_shards


def test_shards_read_back_with_webdataset_and_tarfile(tmp_path):
    samples = tiny_samples(23)
    index = write_tiny(tmp_path, 23, 5, samples=samples)
    names = [s["name"] for s in index["splits"]["train"]["shards"]]
    assert names == [f"train-{i:06d}.tar" for i in range(5)]
    urls = [str(tmp_path / n) for n in names]

    # plain webdataset, no decoding: keys and bytes as written
    got = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    assert sorted(got) == [s["__key__"] for s in samples]
    for s in samples:
        r = got[s["__key__"]]
        assert r["png"] == s["png"]
        assert int(r["cls"]) == s["cls"]
        assert r["txt"].decode() == s["txt"]
        assert json.loads(r["json"]) == s["json"]

    # the stdlib tar reader: one member per key and extension, same bytes, in sample order
    members: dict[str, bytes] = {}
    for url in urls:
        members.update(_tar_members(Path(url)))
    assert len(members) == 4 * 23
    for s in samples:
        assert members[f"{s['__key__']}.png"] == s["png"]
        assert members[f"{s['__key__']}.cls"] == str(s["cls"]).encode()
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "-tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
        assert listing[:4] == [f"s0000.{ext}" for ext in ("cls", "json", "png", "txt")]


def test_tar_reader_formats_and_strictness(tmp_path):
    """`tario` reads ustar, PAX long names, GNU long names (tar -cf), and refuses damaged archives."""
    long_key = "d/" + "x" * 150
    write_shards(
        [{"__key__": long_key, "png": b"p", "cls": 1}, {"__key__": "s", "png": b"q"}], tmp_path, "t", progress=False
    )
    with open(tmp_path / "t-000000.tar", "rb") as f:
        samples = list(iter_samples(f, "t"))
    assert [(s["__key__"], s["png"]) for s in samples] == [(long_key, b"p"), ("s", b"q")] and samples[0]["cls"] == b"1"
    if shutil.which("tar"):
        src = tmp_path / "src" / ("y" * 120)
        src.mkdir(parents=True)
        (src / "a.b.PNG").write_bytes(b"data")
        (src / "a.b.cls").write_bytes(b"3")
        subprocess.run(
            ["tar", "--format=gnu", "-cf", str(tmp_path / "gnu.tar"), "-C", str(tmp_path / "src"), "."], check=True
        )
        with open(tmp_path / "gnu.tar", "rb") as f:
            (sample,) = list(iter_samples(f, "gnu"))
        assert sample["__key__"] == f"./{'y' * 120}/a" and sample["b.png"] == b"data" and sample["b.cls"] == b"3"
    data = (tmp_path / "t-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "t-000000.tar") as tar:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())  # before the zero blocks
    for damaged, match in (
        (b"hello" * 200, "bad header checksum"),
        (data[:700], "unexpected end of data"),
        (data[:end], "no end-of-archive marker"),
    ):
        with pytest.raises(TarReadError, match=match):
            list(iter_samples(io.BytesIO(damaged), "x"))


def test_index_json_contents_and_no_partial_files(tmp_path):
    write_tiny(tmp_path, 10, 2)
    write_tiny(tmp_path, 4, 1, split="val")
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == "mmblocks-wds" and index["format_version"] == FORMAT_VERSION
    assert index["modality"] == "image"
    assert index["class_names"] == ["c0", "c1", "c2"] and index["num_classes"] == 3
    assert {k: v["num_samples"] for k, v in index["splits"].items()} == {"train": 10, "val": 4}
    for split in ("train", "val"):
        entry = index["splits"][split]
        assert entry["command"].startswith("mmblocks.data.write_shards(")
        assert entry["extensions"] == ["cls", "json", "png", "txt"]
        for shard in entry["shards"]:
            assert (tmp_path / shard["name"]).stat().st_size == shard["bytes"]
            assert len({n.split(".")[0] for n in _tar_members(tmp_path / shard["name"])}) == shard["count"]
    assert _leftovers(tmp_path) == []
    assert oct((tmp_path / "train-000000.tar").stat().st_mode & 0o777) != oct(0o600)  # umask, not mkstemp's 0600

    # rewriting a split is refused unless asked for; with fewer shards it removes the stale ones, keeps the others
    with pytest.raises(ShardWriteError, match=r"already has a 'train' split \(10 samples\)"):
        write_shards(tiny_samples(3), tmp_path, "train", max_count=10, progress=False)
    assert read_index(tmp_path).splits["train"].num_samples == 10
    write_shards(tiny_samples(3), tmp_path, "train", max_count=10, command="my command", progress=False, overwrite=True)
    index = read_index(tmp_path)
    assert [s.name for s in index.splits["train"].shards] == ["train-000000.tar"]
    assert not (tmp_path / "train-000001.tar").exists()
    assert index.splits["val"].num_samples == 4
    assert index.command == index.splits["train"].command == "my command"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "train-000000.tar", "val-000000.tar"]


def test_failed_write_leaves_previous_split_untouched(tmp_path):
    write_tiny(tmp_path, 10, 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken():
        yield from tiny_samples(7, prefix="new")  # enough for a complete new shard (max_count 3)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        write_shards(broken(), tmp_path, "train", max_count=3, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_shard_limits_count_and_bytes(tmp_path):
    samples = [{"__key__": f"k{i:03d}", "png": bytes(3000 + i), "cls": 0} for i in range(40)]
    index = write_shards(samples, tmp_path, "train", max_count=100, max_bytes="40kB", progress=False)
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 2 and sum(s["count"] for s in shards) == 40
    assert all(s["bytes"] <= 40_000 for s in shards)
    # one sample larger than max_bytes still gets written, alone
    big = [{"__key__": "big", "png": bytes(50_000)}, {"__key__": "small", "png": bytes(10)}]
    index = write_shards(big, tmp_path / "big", "train", max_bytes=40_000, progress=False)
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [1, 1]
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("500MB") == 500_000_000 and parse_size(7) == 7
    with pytest.raises(ShardWriteError, match="cannot parse"):
        parse_size("lots")


def test_write_shards_encodes_arrays_and_pil_images(tmp_path):
    arr = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    samples = [
        {"__key__": "a", "png": arr, "cls": np.int64(1)},
        {"__key__": "b", "webp": Image.fromarray(arr), "cls": 0},
        {"__key__": "c", "jpg": png_bytes(1), "cls": 0, "__url__": "dropped"},  # bytes: stored as given
    ]
    write_shards(samples, tmp_path, "train", progress=False)
    members = _tar_members(tmp_path / "train-000000.tar")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["a.png"]))), arr)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["b.webp"]))), arr)  # lossless
    assert members["c.jpg"] == png_bytes(1)
    assert members["a.cls"] == b"1"


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        ([{"png": b"x"}], "__key__"),
        ([{"__key__": "a.b", "png": b"x"}], "a '.' would split"),
        ([{"__key__": "a", "png": b"x"}, {"__key__": "a", "png": b"y"}], "duplicate sample key 'a'"),
        ([{"__key__": "a", "cls": 1}], "no image key"),
        ([{"__key__": "a", "png": b"x", "cls": 5}], "label 5 is outside 0..2"),
        ([{"__key__": "a", "png": b"x", "cls": "1"}], "'cls' must be an int"),
        ([{"__key__": "a", "png": b"x", "Bad": b""}], "field name 'Bad'"),
        ([], "no samples"),
    ],
)
def test_write_shards_rejects_bad_samples(tmp_path, samples, match):
    with pytest.raises(ShardWriteError, match=match):
        write_shards(samples, tmp_path, "train", class_names=["a", "b", "c"], progress=False)
    assert not (tmp_path / "index.json").exists() and _leftovers(tmp_path) == []


def test_write_shards_rejects_conflicts_with_the_folder(tmp_path):
    write_tiny(tmp_path, 3, 1)
    with pytest.raises(ShardWriteError, match="class_names differ"):
        write_shards(tiny_samples(2), tmp_path, "val", class_names=["x", "y", "z"], progress=False)
    with pytest.raises(ShardWriteError, match="holds 'image' shards"):
        write_shards([{"__key__": "a", "wav": b"RIFF"}], tmp_path, "val", modality="audio", progress=False)
    with pytest.raises(ShardWriteError, match="unknown modality"):
        write_shards(tiny_samples(2), tmp_path, "val", modality="smell", progress=False)
    with pytest.raises(ShardWriteError, match="split name"):
        write_shards(tiny_samples(2), tmp_path, "a/b", progress=False)


# ------------------------------------------------------------------------------------- folders and manifests


def _image_folder(root: Path) -> dict[str, bytes]:
    """root/cat/{0,1}.png, root/cat/sub/2.jpeg (nested), root/dog/3.png; hidden files are ignored."""
    files = {
        "cat/0.png": png_bytes(0),
        "cat/1.png": png_bytes(1),
        "cat/sub/2.jpeg": png_bytes(2),
        "dog/3.png": png_bytes(3),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    return files


def test_write_from_folder(tmp_path):
    files = _image_folder(tmp_path / "in")
    index = write_from_folder(tmp_path / "in", tmp_path / "out", "train", max_count=3, progress=False)
    assert index["class_names"] == ["cat", "dog"]
    assert index["splits"]["train"]["num_samples"] == 4
    assert "write_from_folder" in index["splits"]["train"]["command"]
    got = {}
    for sample in wds.WebDataset(str(tmp_path / "out" / "train-{000000..000001}.tar"), shardshuffle=False):
        meta = json.loads(sample["json"])
        data = sample.get("png", sample.get("jpg"))
        assert data == files[meta["path"]]  # stored byte for byte; .jpeg -> 'jpg' key
        assert int(sample["cls"]) == ["cat", "dog"].index(meta["class"])
        got[meta["path"]] = sample["__key__"]
    assert sorted(got) == sorted(files)
    assert sorted(got.values()) == [f"train-{i:07d}" for i in range(4)]
    # a second split of the same folder reuses the label ids, and reads with the loader
    (tmp_path / "val" / "dog").mkdir(parents=True)
    (tmp_path / "val" / "dog" / "x.png").write_bytes(png_bytes(9))
    index = write_from_folder(tmp_path / "val", tmp_path / "out", "val", progress=False)
    loader = build_loader(tmp_path / "out", "val", batch_size=4, image_size=8, num_workers=0)
    assert next(iter(loader)).label.tolist() == [1]
    assert set(index["splits"]) == {"train", "val"}


def test_write_from_folder_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ShardWriteError, match="no such folder"):
        write_from_folder(tmp_path / "missing", out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardWriteError, match=r"no class sub-folders.*it is empty"):
        write_from_folder(tmp_path / "empty", out, progress=False)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(png_bytes(0))
    with pytest.raises(ShardWriteError, match="loose files"):
        write_from_folder(tmp_path / "flat", out, progress=False)
    root = tmp_path / "in"
    _image_folder(root)
    (root / "bird").mkdir()
    with pytest.raises(ShardWriteError, match="bird: empty class folder"):
        write_from_folder(root, out, progress=False)
    (root / "bird" / "notes.txt").write_text("hi")
    with pytest.raises(ShardWriteError, match=r"notes.txt: unknown image extension '.txt'"):
        write_from_folder(root, out, progress=False)
    (root / "bird" / "notes.txt").unlink()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(root / "bird" / "red.bmp")
    with pytest.raises(ShardWriteError, match="reencode='png'"):
        write_from_folder(root, out, progress=False)
    assert not out.exists()  # nothing written by any failure
    index = write_from_folder(root, out, reencode="png", progress=False)
    assert index["class_names"] == ["bird", "cat", "dog"] and index["splits"]["train"]["num_samples"] == 5


def _manifest_images(root: Path) -> list[str]:
    (root / "img").mkdir(parents=True)
    paths = []
    for i in range(5):
        (root / "img" / f"{i}.png").write_bytes(png_bytes(i))
        paths.append(f"img/{i}.png")
    return paths


def test_write_from_manifest_jsonl_names_and_captions(tmp_path):
    paths = _manifest_images(tmp_path / "m")
    labels = ["dog", "cat", "dog", "cat", "bird"]
    lines = [json.dumps({"path": p, "label": lab, "caption": f"a {lab}"}) for p, lab in zip(paths, labels)]
    (tmp_path / "m" / "list.jsonl").write_text("\n".join(lines) + "\n\n")
    index = write_from_manifest(tmp_path / "m" / "list.jsonl", tmp_path / "out", "train", progress=False)
    assert index["class_names"] == ["bird", "cat", "dog"]
    rows = {
        json.loads(s["json"])["path"]: s
        for s in wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False)
    }
    for p, lab in zip(paths, labels):
        assert rows[p]["png"] == (tmp_path / "m" / p).read_bytes()
        assert int(rows[p]["cls"]) == ["bird", "cat", "dog"].index(lab)
        assert rows[p]["txt"].decode() == f"a {lab}"


def test_write_from_manifest_csv_int_labels_absolute_paths(tmp_path):
    paths = _manifest_images(tmp_path / "m")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for i, p in enumerate(paths):
            writer.writerow([str(tmp_path / "m" / p), i % 2 + 1])
    index = write_from_manifest(tmp_path / "list.csv", tmp_path / "out", "test", progress=False)
    assert index["class_names"] == ["0", "1", "2"]
    labels = sorted(
        int(s["cls"]) for s in wds.WebDataset(str(tmp_path / "out" / "test-000000.tar"), shardshuffle=False)
    )
    assert labels == [1, 1, 1, 2, 2]


def test_write_from_manifest_errors(tmp_path):
    paths = _manifest_images(tmp_path)
    out = tmp_path / "out"

    def manifest(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    with pytest.raises(ShardWriteError, match="no such manifest"):
        write_from_manifest(tmp_path / "nope.jsonl", out, progress=False)
    with pytest.raises(ShardWriteError, match=r"unknown manifest extension '\.txt'"):
        write_from_manifest(manifest("m.txt", "x"), out, progress=False)
    with pytest.raises(ShardWriteError, match="has no rows"):
        write_from_manifest(manifest("e.jsonl", "\n"), out, progress=False)
    with pytest.raises(ShardWriteError, match=r"missing column\(s\) \['label'\]"):
        write_from_manifest(manifest("c.csv", f"path,caption\n{paths[0]},x\n"), out, progress=False)
    missing = manifest(
        "f.jsonl", json.dumps({"path": paths[0], "label": "a"}) + "\n" + '{"path": "img/9.png", "label": "a"}'
    )
    with pytest.raises(ShardWriteError, match=r"f.jsonl:2: file not found: .*img/9.png"):
        write_from_manifest(missing, out, progress=False)
    with pytest.raises(ShardWriteError, match=r"g.jsonl:1: missing 'label'"):
        write_from_manifest(manifest("g.jsonl", json.dumps({"path": paths[0]})), out, progress=False)
    (tmp_path / "img" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(ShardWriteError, match=r"unknown image extension '\.gif'"):
        write_from_manifest(manifest("h.jsonl", json.dumps({"path": "img/a.gif", "label": 0})), out, progress=False)
    mixed = "path,label\n" + f"{paths[0]},cat\n{paths[1]},3\n"
    with pytest.raises(ShardWriteError, match="mix class names and ints"):
        write_from_manifest(manifest("i.csv", mixed), out, progress=False)
    with pytest.raises(ShardWriteError, match="unknown label 'cow'"):
        write_from_manifest(
            manifest("j.csv", f"path,label\n{paths[0]},cow\n"), out, class_names=["cat"], progress=False
        )
    with pytest.raises(ShardWriteError, match="not valid JSON"):
        write_from_manifest(manifest("k.jsonl", "{oops"), out, progress=False)
    assert not out.exists()


# -------------------------------------------------------------------------------------------- offline datasets


def test_digits_dataset(tmp_path):
    from sklearn.datasets import load_digits

    index = make_dataset("digits", tmp_path, seed=0, progress=False)
    counts = {k: v["num_samples"] for k, v in index["splits"].items()}
    assert counts == {"train": 1257, "val": 270, "test": 270} and sum(counts.values()) == 1797
    assert index["class_names"] == [str(i) for i in range(10)]
    assert index["dataset"]["name"] == "digits" and "make digits" in index["command"]

    digits = load_digits()
    split_idx = digits_splits(seed=0)
    assert sorted(np.concatenate(list(split_idx.values())).tolist()) == list(range(1797))
    overall = np.bincount(digits.target, minlength=10) / 1797
    for split, idx in split_idx.items():
        frac = np.bincount(digits.target[idx], minlength=10) / len(idx)
        assert np.abs(frac - overall).max() < 0.01, split  # stratified
    assert all(np.array_equal(a, b) for a, b in zip(split_idx.values(), digits_splits(seed=0).values()))
    assert not np.array_equal(digits_splits(seed=1)["test"], split_idx["test"])

    # the written test split is exactly those digits, pixels scaled 0..16 -> 0..255
    got = {}
    for url in sorted(tmp_path.glob("test-*.tar")):
        for s in wds.WebDataset(str(url), shardshuffle=False):
            got[json.loads(s["json"])["index"]] = (np.asarray(Image.open(io.BytesIO(s["png"]))), int(s["cls"]))
    assert sorted(got) == split_idx["test"].tolist()
    i = split_idx["test"][0]
    image, label = got[int(i)]
    assert image.shape == (8, 8) and image.dtype == np.uint8 and label == digits.target[i]
    assert np.array_equal(image, np.round(digits.images[i] * 255 / 16).astype(np.uint8))


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("textures")
    make_dataset("textures", out, seed=0, progress=False)  # the defaults: ~4 s
    return out


def test_textures_dataset_size_and_classes(textures):
    index = read_index(textures)
    assert index.class_names == list(TEXTURE_PHOTOS) and len(index.class_names) >= 12
    counts = {k: v.num_samples for k, v in index.splits.items()}
    assert counts == {"train": 17 * 320, "val": 17 * 64, "test": 17 * 64} and sum(counts.values()) >= 5000
    assert set(index.dataset["regions"]["photos"]) == set(TEXTURE_PHOTOS)
    loader = build_loader(textures, "test", batch_size=256, image_size=32, num_workers=0, shuffle=False)
    labels = np.concatenate([b.label.numpy() for b in loader])
    assert np.array_equal(np.bincount(labels), np.full(17, 64))


def test_textures_splits_share_no_pixel(textures):
    index = read_index(textures)
    regions = index.dataset["regions"]["photos"]
    masks = {
        name: {s: np.zeros(info["shape"], bool) for s in ("train", "val", "test")} for name, info in regions.items()
    }
    seen_boxes = 0
    for url in sorted(textures.glob("*.tar")):
        for s in wds.WebDataset(str(url), shardshuffle=False):
            meta = json.loads(s["json"])
            split = url.name.split("-")[0]
            assert meta["split"] == split
            x0, y0, x1, y1 = meta["box"]
            cx0, cy0, cx1, cy1 = meta["cell"]
            assert cx0 <= x0 < x1 <= cx1 and cy0 <= y0 < y1 <= cy1  # the crop stays inside its cell
            info = regions[meta["source"]]
            row, col = info["ys"].index(cy0), info["xs"].index(cx0)
            assert ("train", "val", "test")[int(info["grid"][row][col])] == split  # the cell belongs to the split
            masks[meta["source"]][split][y0:y1, x0:x1] = True
            seen_boxes += 1
    assert seen_boxes == 17 * 448
    for name, m in masks.items():
        for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
            assert not (m[a] & m[b]).any(), f"{name}: {a} and {b} crops share pixels"
        for split in ("train", "val", "test"):
            assert m[split].any()


def test_textures_deterministic_and_refuses_downloads():
    kw = dict(photos=TEXTURE_PHOTOS[:12], crops_per_class=(4, 2, 2))
    a, regions_a = texture_splits(seed=3, **kw)
    b, regions_b = texture_splits(seed=3, **kw)
    c, _ = texture_splits(seed=4, **kw)
    assert regions_a == regions_b
    assert [s["png"] for s in a["train"]] == [s["png"] for s in b["train"]]
    assert [s["png"] for s in a["train"]] != [s["png"] for s in c["train"]]
    assert len({s["cls"] for s in a["test"]}) == 12
    with pytest.raises(ValueError, match="downloads"):
        texture_splits(photos=["astronaut", "brain", "camera"], crops_per_class=(1, 1, 1))
    with pytest.raises(ValueError, match="cat is chelsea"):
        texture_splits(photos=["cat", "chelsea"], crops_per_class=(1, 1, 1))
    with pytest.raises(ShardWriteError, match="unknown dataset"):
        make_dataset("mnist", "/nonexistent")


def test_make_textures_small(tmp_path):
    index = make_dataset("textures", tmp_path, seed=1, crops_per_class=(10, 3, 3), fmt="jpg", progress=False)
    assert {k: v["num_samples"] for k, v in index["splits"].items()} == {"train": 170, "val": 51, "test": 51}
    sample = next(iter(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False)))
    assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
    assert os.path.getsize(tmp_path / "index.json") < 100_000
