"""``shards write`` for points / audio / video: folders and manifests, validation on write, bad files, the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from mmblocks.cli import main
from mmblocks.data import (
    FILE_EXTENSIONS,
    MODALITY_KEYS,
    ShardWriteError,
    read_index,
    write_from_folder,
    write_from_manifest,
    write_shards,
)
from mmblocks.data.video_io import encode_video


def _samples(out: Path, split: str = "train") -> dict[str, dict]:
    """``{json path: sample}`` of a split, read with plain webdataset (bytes)."""
    urls = [str(p) for p in sorted(out.glob(f"{split}-*.tar"))]
    return {json.loads(s["json"])["path"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _audio(seconds: float, rate: int, fmt: str, channels: int = 1) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t)
    x = np.stack([x] * channels, axis=1) if channels > 1 else x
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _video(frames: int = 6, size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_video(rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8), fps=8, codec="mpeg4")


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def test_modality_names():
    assert set(MODALITY_KEYS) == set(FILE_EXTENSIONS) == {"image", "audio", "points", "video"}
    assert MODALITY_KEYS["points"] == ("npy",)
    with pytest.raises(ShardWriteError, match="unknown modality 'pointcloud'"):
        write_shards(
            [{"__key__": "a", "npy": np.zeros((4, 3), np.float32)}], "/nonexistent", "train", modality="pointcloud"
        )


# ---------------------------------------------------------------------------------------------------- points


def test_points_from_folder_float32_as_is_others_converted(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((100, 3)).astype(np.float32)
    f64 = rng.standard_normal((50, 6))  # xyz + 3 features
    f16 = rng.standard_normal((20, 3)).astype(np.float16)
    files = {"chair/a.npy": _npy(f32), "chair/b.npy": _npy(f64), "table/c.npy": _npy(f16)}
    _tree(tmp_path / "in", files)
    index = write_from_folder(tmp_path / "in", tmp_path / "out", modality="points", progress=False)
    assert index["modality"] == "points" and index["class_names"] == ["chair", "table"]
    got = _samples(tmp_path / "out")
    assert got["chair/a.npy"]["npy"] == files["chair/a.npy"]  # float32: byte for byte
    meta = json.loads(got["chair/a.npy"]["json"])
    assert meta == {"path": "chair/a.npy", "class": "chair", "points": 100, "channels": 3}
    for ref, original in (("chair/b.npy", f64), ("table/c.npy", f16)):
        arr = np.load(io.BytesIO(got[ref]["npy"]), allow_pickle=False)
        assert arr.dtype == np.float32 and arr.shape == original.shape
        np.testing.assert_array_equal(arr, original.astype(np.float32))
        assert json.loads(got[ref]["json"])["converted_from"] == str(original.dtype)
    decoded = next(iter(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False).decode()))
    assert decoded["npy"].dtype == np.float32


@pytest.mark.parametrize(
    "data, match",
    [
        (_npy(np.zeros((10, 2), np.float32)), r"\[P, 3\+C\].*got \[10, 2\]"),
        (_npy(np.zeros(30, np.float32)), r"got \[30\]"),
        (_npy(np.zeros((0, 3), np.float32)), r"P >= 1"),
        (_npy(np.zeros((4, 3, 1), np.float32)), r"got \[4, 3, 1\]"),
        (_npy(np.arange(12).reshape(4, 3)), "must hold floats.*int64"),
        (_npy(np.array([[0, 0, np.nan], [1, 1, 1]], np.float32)), "NaN.*row 0"),
        (_npy(np.array([[0, 0, 0], [1, 1, 1e300]])), "inf.*row 1"),
        (b"not an npy file", "not a .npy file"),
        (_npy(np.array([{"a": 1}], dtype=object)), "not a readable .npy"),  # pickles are refused
    ],
)
def test_points_bad_files(tmp_path, data, match):
    _tree(tmp_path / "in", {"ok/good.npy": _npy(np.zeros((5, 3), np.float32)), "ok/bad.npy": data})
    with pytest.raises(ShardWriteError, match=match) as err:
        write_from_folder(tmp_path / "in", tmp_path / "out", modality="points", progress=False)
    assert "bad.npy" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_bad_file_keeps_the_previous_split(tmp_path):
    _tree(tmp_path / "in", {"a/x.npy": _npy(np.zeros((5, 3), np.float32))})
    write_from_folder(tmp_path / "in", tmp_path / "out", modality="points", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    _tree(tmp_path / "in", {"a/y.npy": b"garbage"})
    with pytest.raises(ShardWriteError, match=r"y\.npy"):
        write_from_folder(tmp_path / "in", tmp_path / "out", modality="points", progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert _leftovers(tmp_path / "out") == []


# ----------------------------------------------------------------------------------------------------- audio


def test_audio_from_manifest_jsonl_and_csv(tmp_path):
    files = {
        "clips/yes1.flac": _audio(0.5, 16000, "FLAC"),
        "clips/no1.wav": _audio(0.25, 22050, "WAV", channels=2),
        "clips/yes2.wav": _audio(1.0, 8000, "WAV"),
    }
    _tree(tmp_path, files)
    rows = [("clips/yes1.flac", "yes", "yes"), ("clips/no1.wav", "no", "no"), ("clips/yes2.wav", "yes", "yes!")]
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "label": y, "caption": c}) + "\n" for p, y, c in rows))
    index = write_from_manifest(jsonl, tmp_path / "out", modality="audio", progress=False)
    assert index["modality"] == "audio" and index["class_names"] == ["no", "yes"]
    assert index["splits"]["train"]["extensions"] == ["cls", "flac", "json", "txt", "wav"]
    got = _samples(tmp_path / "out")
    assert got["clips/yes1.flac"]["flac"] == files["clips/yes1.flac"] and "wav" not in got["clips/yes1.flac"]
    assert got["clips/no1.wav"]["wav"] == files["clips/no1.wav"] and got["clips/yes2.wav"]["txt"] == b"yes!"
    meta = json.loads(got["clips/no1.wav"]["json"])
    assert meta["sample_rate"] == 22050 and meta["channels"] == 2 and meta["frames"] == round(0.25 * 22050)
    assert meta["duration"] == pytest.approx(0.25, abs=1e-4) and meta["class"] == "no"
    assert json.loads(got["clips/yes2.wav"]["json"])["duration"] == 1.0

    csv = tmp_path / "val.csv"
    csv.write_text("path,label\nclips/yes1.flac,yes\nclips/no1.wav,no\n")
    index = write_from_manifest(csv, tmp_path / "out", "val", modality="audio", progress=False)
    assert index["splits"]["val"]["num_samples"] == 2 and index["class_names"] == ["no", "yes"]
    assert json.loads(_samples(tmp_path / "out", "val")["clips/yes1.flac"]["json"])["sample_rate"] == 16000


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("bad.flac", b"fLaC" + bytes(100), "not readable flac audio"),
        ("bad.wav", b"RIFF1234WAVEjunk", "not readable wav audio"),
        ("bad.flac", _audio(0.1, 16000, "WAV"), "holds WAV audio"),
        ("bad.wav", _audio(0.0, 16000, "WAV"), "no samples"),
    ],
)
def test_audio_bad_files(tmp_path, name, data, match):
    _tree(tmp_path, {"a/good.flac": _audio(0.1, 16000, "FLAC"), f"a/{name}": data})
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "a/good.flac", "label": 0}) + "\n" + json.dumps({"path": f"a/{name}", "label": 1}) + "\n"
    )
    with pytest.raises(ShardWriteError, match=match) as err:
        write_from_manifest(tmp_path / "m.jsonl", tmp_path / "out", modality="audio", progress=False)
    assert name in str(err.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- video


def test_video_from_folder_and_manifest(tmp_path):
    files = {"wave/a.mp4": _video(6, 32, 0), "clap/b.mp4": _video(4, 48, 1)}
    _tree(tmp_path / "in", files)
    index = write_from_folder(tmp_path / "in", tmp_path / "out", modality="video", progress=False)
    assert index["modality"] == "video" and index["class_names"] == ["clap", "wave"]
    got = _samples(tmp_path / "out")
    assert got["wave/a.mp4"]["mp4"] == files["wave/a.mp4"]
    meta = json.loads(got["clap/b.mp4"]["json"])
    assert {k: meta[k] for k in ("frames", "fps", "width", "height", "codec")} == {
        "frames": 4,
        "fps": 8.0,
        "width": 48,
        "height": 48,
        "codec": "mpeg4",
    }
    assert meta["duration"] == pytest.approx(0.5, abs=0.01)

    (tmp_path / "m.csv").write_text(f"path,label,caption\n{tmp_path / 'in/wave/a.mp4'},wave,someone waves\n")
    index = write_from_manifest(tmp_path / "m.csv", tmp_path / "out", "test", modality="video", progress=False)
    sample = next(iter(_samples(tmp_path / "out", "test").values()))
    assert int(sample["cls"]) == 1 and sample["txt"] == b"someone waves"
    assert json.loads(sample["json"])["frames"] == 6


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x00\x00\x00\x18ftypmp42" + bytes(200), "not a decodable mp4"),
        (_video()[: len(_video()) // 2], "not a decodable mp4"),
        (b"", "not a decodable mp4"),
        (_audio(0.1, 16000, "WAV"), "holds a 'wav' container"),
    ],
)
def test_video_bad_files(tmp_path, data, match):
    _tree(tmp_path / "in", {"a/good.mp4": _video(), "a/bad.mp4": data})
    with pytest.raises(ShardWriteError, match=match) as err:
        write_from_folder(tmp_path / "in", tmp_path / "out", modality="video", progress=False)
    assert "bad.mp4" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_wrong_extension_for_the_modality(tmp_path):
    _tree(tmp_path / "in", {"a/x.flac": _audio(0.1, 16000, "FLAC")})
    with pytest.raises(ShardWriteError, match=r"unknown points extension '.flac' \(stored as is: .npy\)"):
        write_from_folder(tmp_path / "in", tmp_path / "out", modality="points", progress=False)
    with pytest.raises(ShardWriteError, match="reencode must be None"):
        write_from_folder(tmp_path / "in", tmp_path / "out", modality="audio", reencode="png", progress=False)
    write_from_folder(tmp_path / "in", tmp_path / "out", modality="audio", progress=False)
    _tree(tmp_path / "pts", {"a/x.npy": _npy(np.zeros((3, 3), np.float32))})
    with pytest.raises(ShardWriteError, match="holds 'audio' shards"):
        write_from_folder(tmp_path / "pts", tmp_path / "out", "val", modality="points", progress=False)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_shards_write_each_modality(tmp_path, capsys):
    trees = {
        "points": {"a/x.npy": _npy(np.ones((8, 3), np.float32)), "b/y.npy": _npy(np.ones((9, 4)))},
        "audio": {"a/x.flac": _audio(0.2, 16000, "FLAC"), "b/y.wav": _audio(0.3, 16000, "WAV")},
        "video": {"a/x.mp4": _video(3), "b/y.mp4": _video(5)},
    }
    for modality, files in trees.items():
        _tree(tmp_path / modality, files)
        out = tmp_path / f"{modality}-shards"
        argv = ["shards", "write", "--modality", modality, "--from-folder", str(tmp_path / modality), "--out", str(out)]
        assert main([*argv, "--split", "val", "--max-count", "1"]) == 0
        index = read_index(out)
        assert index.modality == modality and index.splits["val"].num_samples == 2
        assert len(index.splits["val"].shards) == 2
    capsys.readouterr()
    (tmp_path / "video" / "b" / "z.mp4").write_bytes(b"junk")
    argv = ["shards", "write", "--modality", "video", "--from-folder", str(tmp_path / "video"), "--out", str(tmp_path)]
    assert main([*argv, "--split", "x"]) == 2
    err = capsys.readouterr().err
    assert "mmblocks: error:" in err and "z.mp4" in err and "not a decodable mp4" in err
