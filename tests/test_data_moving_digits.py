"""The ``moving-digits`` video dataset: digit-disjoint splits, balance, decodable mp4, motion = label, no frame cue."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from mmblocks.data import DIRECTIONS, digits_splits, make_dataset, make_moving_digits, read_index
from mmblocks.data.moving_digits import (
    DIRECTION_PHRASES,
    _background,
    caption,
    digit_trajectory,
    draw_motion,
    parse_caption,
    render_clip,
)

SPLITS = ("train", "val", "test")
SMALL = dict(clips_per_class=(4, 2, 2), max_count=20, progress=False)


def _read(folder: Path, split: str) -> list[dict]:
    urls = [str(p) for p in sorted(folder.glob(f"{split}-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _decode(data: bytes) -> tuple[np.ndarray, float, str]:
    """All frames ``[T, H, W, 3]`` with plain PyAV, the stream's fps and codec name."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate), stream.codec_context.name


def _torus_centroids(frames: np.ndarray, threshold: int = 160) -> np.ndarray:
    """Per-frame centroid ``[T, 2]`` (x, y) of the bright pixels on the wrapping canvas (circular mean per axis)."""
    t, h, w = frames.shape[:3]
    out = np.zeros((t, 2))
    for i, frame in enumerate(frames[..., 0].astype(np.float64)):
        weight = np.clip(frame - threshold, 0, None)
        ys, xs = np.mgrid[0:h, 0:w]
        for axis, (coord, size) in enumerate(((xs, w), (ys, h))):
            angle = 2 * np.pi * coord / size
            mean = np.arctan2((weight * np.sin(angle)).sum(), (weight * np.cos(angle)).sum())
            out[i, axis] = (mean % (2 * np.pi)) * size / (2 * np.pi)
    return out


def _displacement(centroids: np.ndarray, size: int) -> np.ndarray:
    """Total (dx, dy) from the first to the last frame, unwrapping each step to [-size/2, size/2)."""
    steps = np.diff(centroids, axis=0)
    steps = (steps + size / 2) % size - size / 2
    return steps.sum(0)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moving_digits")
    make_dataset("moving-digits", out, seed=0, **SMALL)
    return out


def test_index_balance_and_digit_disjoint_splits(videos):
    index = read_index(videos)
    assert index.modality == "video" and index.class_names == list(DIRECTIONS)
    assert {k: v.num_samples for k, v in index.splits.items()} == {"train": 32, "val": 16, "test": 16}
    assert index.splits["train"].extensions == ["cls", "json", "mp4"]
    assert index.dataset["name"] == "moving-digits" and "disjoint" in index.dataset["split_policy"]
    pools = digits_splits(0)
    used = {}
    for split, per_class in zip(SPLITS, (4, 2, 2)):
        samples = _read(videos, split)
        labels = np.array([int(s["cls"]) for s in samples])
        assert np.array_equal(np.bincount(labels, minlength=8), np.full(8, per_class))
        metas = [json.loads(s["json"]) for s in samples]
        assert all(m["direction"] == DIRECTIONS[int(s["cls"])] for m, s in zip(metas, samples))
        used[split] = {m["digit_index"] for m in metas}
        assert used[split] <= set(pools[split].tolist())
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        assert not used[a] & used[b], f"{a} and {b} share a digit image"


def test_frames_decode_and_digit_moves_in_the_labelled_direction(videos):
    checked = 0
    for split in SPLITS:
        for s in _read(videos, split):
            meta = json.loads(s["json"])
            frames, fps, codec = _decode(s["mp4"])
            assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
            assert fps == 8 and codec == "mpeg4"
            assert np.abs(frames[..., 0].astype(int) - frames[..., 2]).max() <= 8  # grey, up to yuv420p rounding
            dx, dy = _displacement(_torus_centroids(frames), 64)
            angle = np.degrees(np.arctan2(-dy, dx)) % 360  # image y points down
            assert round(angle / 45) % 8 == int(s["cls"]), (meta, dx, dy)
            assert np.hypot(dx, dy) == pytest.approx(meta["speed"] * 15, abs=3.0)
            checked += 1
    assert checked == 64


def test_no_single_frame_cue():
    """Digit positions in the first and the last frame are uniform on the torus for every direction."""
    size, frames = 64, 16
    for direction in range(8):
        firsts, lasts = [], []
        for j in range(400):
            start, _, velocity = draw_motion(np.random.default_rng([9, direction, j]), direction, size)
            pos = digit_trajectory(start, velocity, frames) % size
            firsts.append(pos[0])
            lasts.append(pos[-1])
        for positions in (np.array(firsts), np.array(lasts)):
            angles = 2 * np.pi * positions / size
            resultant = np.hypot(np.cos(angles).mean(0), np.sin(angles).mean(0))  # 0 = uniform, 1 = one point
            assert (resultant < 0.15).all(), (DIRECTIONS[direction], resultant)
            assert (positions.min(0) <= 2).all() and (positions.max(0) >= size - 3).all()  # the full range


def test_render_wraps_and_keeps_the_digit():
    digit = np.full((8, 8), 16.0)
    background = _background(np.random.default_rng(0), 64, "noise")
    assert background.shape == (64, 64) and background.min() >= 0 and background.max() <= 96
    clip = render_clip(digit, np.array([[0, 0], [56, 60], [-4, 70]]), np.zeros((64, 64), np.float32), 16)
    bright = clip[..., 0] > 200
    assert bright.sum(axis=(1, 2)).tolist() == [256, 256, 256]  # the whole digit, also across the edges
    assert bright[1, 60:, 56:].all() and bright[1, :12, :8].all()


def test_plain_webdataset_and_reproducible(videos, tmp_path):
    urls = [str(p) for p in sorted(videos.glob("val-*.tar"))]
    sample = next(iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()))
    assert isinstance(sample["mp4"], bytes) and isinstance(sample["cls"], int) and "digit_index" in sample["json"]
    make_moving_digits(tmp_path / "a", seed=0, **SMALL)
    for path in sorted(videos.glob("*.tar")):
        assert (tmp_path / "a" / path.name).read_bytes() == path.read_bytes(), path.name
    make_moving_digits(tmp_path / "b", seed=1, **dict(SMALL, clips_per_class=(1, 1, 1)))
    other = {s["__key__"]: s["mp4"] for s in _read(tmp_path / "b", "test")}
    same_seed = {s["__key__"]: s["mp4"] for s in _read(videos, "test")}
    assert all(other[k] != same_seed[k] for k in other)


def test_caption_variant_keeps_held_out_motions_out_of_training(tmp_path):
    """``moving-digit-captions``: ``txt`` says the digit and its direction; no training clip shows a held-out
    (digit, direction) pair, while the test split holds them."""
    import json as _json

    import webdataset as _wds

    from mmblocks.data import make_dataset
    from mmblocks.data.moving_digits import DIRECTIONS, HELD_OUT_MOTIONS, caption

    make_dataset("moving-digit-captions", tmp_path, seed=0, clips_per_class=(12, 0, 12), progress=False)
    seen = {}
    for split in ("train", "test"):
        urls = sorted(str(p) for p in tmp_path.glob(f"{split}-*.tar"))
        pairs = []
        for sample in _wds.WebDataset(urls, shardshuffle=False):
            meta = _json.loads(sample["json"])
            c = DIRECTIONS.index(meta["direction"])
            assert sample["txt"].decode() == caption(meta["digit"], c) == meta["caption"]
            assert meta["held_out"] == ((meta["digit"], c) in HELD_OUT_MOTIONS)
            pairs.append((meta["digit"], c))
        seen[split] = pairs
    assert not set(seen["train"]) & HELD_OUT_MOTIONS
    assert set(seen["test"]) & HELD_OUT_MOTIONS
    assert caption(3, 3) == "the digit 3 moves up and to the left"


def test_parse_caption_reads_back_every_caption_and_refuses_what_it_cannot_read():
    for digit in range(10):
        for direction in range(len(DIRECTION_PHRASES)):
            assert parse_caption(caption(digit, direction)) == (digit, direction)
            assert parse_caption(caption(digit, direction).upper() + ".") == (digit, direction)
    assert parse_caption("the digit 3 moves up and to the left, quickly") == (3, 3)  # not "up"
    assert parse_caption("The digit 7 moves sideways") == (7, None)
    assert parse_caption("a seven moves up") == (None, None)
    assert parse_caption("") == (None, None)
