"""``moving-digits``: short mp4 clips of a real handwritten digit moving in one of 8 directions; class = direction.

``mmblocks shards make moving-digits --out DIR`` calls `make_moving_digits`. Built offline from scikit-learn's
`load_digits` (1797 real 8x8 digits); encoded with `mmblocks.data.video_io.encode_video` as MPEG-4 Part 2
(``mpeg4``, no B-frames, only frame 0 intra), so the decoder exports codec motion vectors.

* Clip: `frames` frames (default 16) of `size` x `size` RGB (default 64x64, grey: R = G = B) at `fps` (default 8).
  The 8x8 digit (values 0..16) is upscaled to `digit_size` px (default 16, bicubic) and alpha-composited in white
  over a static background (default ``"noise"``: smooth random value noise in 0..96, a new one per clip; ``"none"``:
  black), so the background's motion vectors are zero and the digit's are the motion.
* Motion: class c in `DIRECTIONS` (E, NE, N, NW, W, SW, S, SE) moves the digit at angle ``45 * c`` degrees
  counter-clockwise from east (image y points down: N decreases the row), at a constant speed drawn uniformly
  from `speed_range` px per frame (default 1.5..3.0), positions rounded to whole pixels.
* No class information in a single frame: the canvas is a torus (the digit wraps around the edges) and the start
  position is uniform over the whole canvas, so the digit's position in *any* frame is uniform and independent of
  the direction; digit, speed and background are drawn independently of the class. Only the motion between frames
  tells the class.
* Split: the digit images are split disjointly with `mmblocks.data.datasets.digits_splits` (stratified,
  70/15/15 by default): a val or test clip never shows a digit image used in training.

Each sample: ``mp4``, ``cls`` the direction index, ``json`` ``{"digit_index" (row of load_digits), "digit" (its
label), "direction", "angle", "start" [x, y] (digit top-left at frame 0, px, before wrapping), "speed" (px/frame),
"velocity" [vx, vy] (px/frame, image axes), "frames", "fps", "size", "digit_size", "background", "seed"}``.
Classes are balanced (`clips_per_class` per split). Deterministic given `seed` (the same mp4 bytes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .registry import register_dataset
from .shards import write_shards

__all__ = [
    "DIRECTIONS",
    "DIRECTION_PHRASES",
    "HELD_OUT_MOTIONS",
    "caption",
    "digit_trajectory",
    "draw_motion",
    "make_moving_digit_captions",
    "make_moving_digits",
    "parse_caption",
    "render_clip",
]

SPLITS = ("train", "val", "test")

#: Class names: direction of motion, 45 degrees apart, counter-clockwise from east.
DIRECTIONS = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")
#: How a caption says each direction (image up = north).
DIRECTION_PHRASES = (
    "right",
    "up and to the right",
    "up",
    "up and to the left",
    "left",
    "down and to the left",
    "down",
    "down and to the right",
)
#: (digit, direction index) pairs that ``moving-digit-captions`` keeps out of training: digit d never moves in
#: direction d mod 8 there, while val / test hold every pair.
HELD_OUT_MOTIONS: frozenset[tuple[int, int]] = frozenset((d, d % 8) for d in range(10))


def caption(digit: int, direction: int) -> str:
    """ "the digit 3 moves up and to the left"."""
    return f"the digit {digit} moves {DIRECTION_PHRASES[direction]}"


_CAPTION = re.compile(r"\bdigit\s+(\d)\b(?:\s+moves\s+(.*))?")


def parse_caption(text: str) -> tuple[int | None, int | None]:
    """``(digit, direction index)`` read from a generated caption (`caption`'s wording; case, punctuation and extra
    words after the phrase are ignored); None for what cannot be read. The phrase must be one of
    `DIRECTION_PHRASES` exactly: "up and to the left" is NW, a bare "up" is N."""
    words = " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())
    found = _CAPTION.search(words)
    if found is None:
        return None, None
    digit, rest = int(found.group(1)), (found.group(2) or "")
    direction = None
    for i, phrase in sorted(enumerate(DIRECTION_PHRASES), key=lambda p: -len(p[1])):  # longest phrase first
        if rest == phrase or rest.startswith(phrase + " "):
            direction = i
            break
    return digit, direction


def _velocity(direction: int, speed: float) -> tuple[float, float]:
    """(vx, vy) in px/frame in image axes (x right, y down) for direction index `direction`."""
    angle = np.deg2rad(45.0 * direction)
    return float(speed * np.cos(angle)), float(-speed * np.sin(angle))


def draw_motion(
    rng: np.random.Generator, direction: int, size: int = 64, speed_range: Sequence[float] = (1.5, 3.0)
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(start [x, y] uniform over the whole ``size`` x ``size`` canvas, speed uniform in `speed_range` px/frame,
    velocity (vx, vy) of `direction`). The start never depends on the direction (no single-frame cue)."""
    start = rng.uniform(0.0, size, size=2)
    speed = float(rng.uniform(float(speed_range[0]), float(speed_range[1])))
    return start, speed, _velocity(direction, speed)


def digit_trajectory(start: Sequence[float], velocity: Sequence[float], frames: int) -> np.ndarray:
    """Integer top-left positions ``[frames, 2]`` (x, y) before wrapping: ``round(start + t * velocity)``."""
    t = np.arange(frames, dtype=np.float64)[:, None]
    return np.rint(np.asarray(start, np.float64)[None] + t * np.asarray(velocity, np.float64)[None]).astype(np.int64)


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A static ``[size, size]`` float32 background in 0..96 (value noise: coarse + medium + fine), or zeros."""
    if kind == "none":
        return np.zeros((size, size), np.float32)
    from PIL import Image

    out = np.zeros((size, size), np.float64)
    for cells, weight in ((4, 0.5), (8, 0.3), (size // 2, 0.2)):
        grid = rng.random((cells, cells)).astype(np.float32)
        out += weight * np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
    out = (out - out.min()) / max(float(out.max() - out.min()), 1e-6)
    return (96.0 * out).astype(np.float32)


def render_clip(digit: np.ndarray, positions: np.ndarray, background: np.ndarray, digit_size: int = 16) -> np.ndarray:
    """Frames uint8 ``[T, H, W, 3]``: the 8x8 `digit` (0..16) upscaled to `digit_size` and composited in white over
    `background` ``[H, W]`` at the top-left `positions` ``[T, 2]`` (x, y), wrapping around the edges."""
    from PIL import Image

    height, width = background.shape
    alpha = np.asarray(
        Image.fromarray(digit.astype(np.float32) / 16.0).resize((digit_size, digit_size), Image.Resampling.BICUBIC)
    ).clip(0.0, 1.0)
    layer = np.zeros((height, width), np.float32)
    layer[:digit_size, :digit_size] = alpha
    frames = np.empty((len(positions), height, width, 3), np.uint8)
    for t, (x, y) in enumerate(positions):
        a = np.roll(layer, (int(y) % height, int(x) % width), axis=(0, 1))
        frame = background * (1.0 - a) + 255.0 * a
        frames[t] = np.rint(frame).clip(0, 255).astype(np.uint8)[..., None]
    return frames


@register_dataset("moving-digits")
def make_moving_digits(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    clips_per_class: Sequence[int] = (100, 20, 20),
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    size: int = 64,
    frames: int = 16,
    fps: float = 8,
    digit_size: int = 16,
    speed_range: Sequence[float] = (1.5, 3.0),
    background: str = "noise",
    quality: int = 3,
    max_count: int = 1000,
    max_bytes: int | str = 1_000_000_000,
    command: str | None = None,
    progress: bool = True,
    captions: bool = False,
) -> dict[str, Any]:
    """Write the ``moving-digits`` video dataset (module docstring: motion, no single-frame cue, digit split).

    Defaults: 8 directions x 100/20/20 clips for train/val/test (1120 clips of 16 frames 64x64 at 8 fps, MPEG-4
    quantiser `quality` 3, ~7 MB, ~8 s on 2 cores). Clip j of class c in split s draws its digit (uniform over the
    split's digit images), start, speed and background from ``np.random.default_rng([seed, s, c, j])``.
    With `captions` (``moving-digit-captions``) each sample also holds its caption in ``txt`` and training clips
    never show a pair of `HELD_OUT_MOTIONS` (such a draw takes the next digit image of another digit).
    Returns the index contents.
    """
    from sklearn.datasets import load_digits

    from .datasets import digits_splits  # here: datasets imports this module to register the maker
    from .video_io import encode_video

    if len(clips_per_class) != 3 or any(int(c) < 0 for c in clips_per_class):
        raise ValueError(f"clips_per_class must be three non-negative counts (train, val, test): {clips_per_class}")
    if background not in ("noise", "none"):
        raise ValueError(f"background must be 'noise' or 'none', got {background!r}")
    if not 1 <= digit_size <= size or size % 2 or frames < 2:
        raise ValueError(f"need an even size >= digit_size >= 1 and frames >= 2 (got {size}, {digit_size}, {frames})")
    lo, hi = (float(v) for v in speed_range)
    if not 0 < lo <= hi:
        raise ValueError(f"speed_range must be 0 < low <= high, got {tuple(speed_range)}")
    counts = dict(zip(SPLITS, (int(c) for c in clips_per_class)))
    digits = load_digits()
    pools = digits_splits(seed, fractions)
    for split in SPLITS:
        if counts[split] and len(pools[split]) == 0:
            raise ValueError(f"fractions {tuple(fractions)} give the {split} split no digit images")
    description = {
        "name": "moving-digits",
        "source": "sklearn.datasets.load_digits digits moving on a torus canvas; mp4 (mpeg4) via PyAV",
        "seed": seed,
        "classes": "direction of motion, 45 degrees apart counter-clockwise from east (image y down)",
        "clips_per_class": counts,
        "size": size,
        "frames": frames,
        "fps": fps,
        "digit_size": digit_size,
        "speed_range": [lo, hi],
        "background": background,
        "codec": "mpeg4",
        "quality": quality,
        "no_single_frame_cue": "uniform start on a wrapping canvas: every frame's digit position is uniform and "
        "independent of the class; digit, speed and background drawn independently of the class",
        "split_policy": "digit images disjoint between train, val and test (digits_splits, stratified by digit)",
        "digit_fractions": dict(zip(SPLITS, (float(f) for f in fractions))),
        "digit_counts": {split: len(pools[split]) for split in SPLITS},
    }
    if captions:
        description["name"] = "moving-digit-captions"
        description["captions"] = "txt: 'the digit 3 moves up and to the left'"
        description["held_out_motions"] = sorted([d, DIRECTIONS[c]] for d, c in HELD_OUT_MOTIONS)
        description["split_policy"] += "; held-out (digit, direction) pairs never in train, all pairs in val / test"
    name = "moving-digit-captions" if captions else "moving-digits"
    command = command or f"mmblocks shards make {name} --out {out} --seed {seed}"
    result: dict[str, Any] = {}
    for s, split in enumerate(SPLITS):
        if counts[split] == 0:
            continue
        jobs = [(c, j) for c in range(len(DIRECTIONS)) for j in range(counts[split])]
        order = np.random.default_rng([seed, 1000 + s]).permutation(len(jobs))

        def samples(split: str = split, s: int = s, jobs: list = jobs, order: np.ndarray = order):
            pool = pools[split]
            for k in order:
                c, j = jobs[k]
                draw = [seed, s, c, j]
                rng = np.random.default_rng(draw)
                index = int(pool[int(rng.integers(len(pool)))])
                if captions and split == "train":
                    while (int(digits.target[index]), c) in HELD_OUT_MOTIONS:
                        index = int(pool[int(rng.integers(len(pool)))])
                start, speed, velocity = draw_motion(rng, c, size, (lo, hi))
                bg = _background(rng, size, background)
                positions = digit_trajectory(start, velocity, frames)
                clip = render_clip(digits.images[index], positions, bg, digit_size)
                meta = {
                    "digit_index": index,
                    "digit": int(digits.target[index]),
                    "direction": DIRECTIONS[c],
                    "angle": 45 * c,
                    "start": [round(float(v), 4) for v in start],
                    "speed": round(speed, 4),
                    "velocity": [round(v, 4) for v in velocity],
                    "frames": frames,
                    "fps": fps,
                    "size": [size, size],
                    "digit_size": digit_size,
                    "background": background,
                    "seed": draw,
                }
                mp4 = encode_video(clip, fps=fps, codec="mpeg4", quality=quality)
                sample = {"__key__": f"{DIRECTIONS[c]}-{split}-{j:05d}", "mp4": mp4, "cls": c, "json": meta}
                if captions:
                    sample["txt"] = meta["caption"] = caption(int(digits.target[index]), c)
                    meta["held_out"] = (int(digits.target[index]), c) in HELD_OUT_MOTIONS
                yield sample

        result = write_shards(
            samples(),
            out,
            split,
            max_count=max_count,
            max_bytes=max_bytes,
            modality="video",
            class_names=list(DIRECTIONS),
            command=command,
            dataset=description,
            total=len(jobs),
            progress=progress,
            overwrite=True,  # make_dataset refused an existing dataset unless asked to replace it
        )
    return result


@register_dataset("moving-digit-captions")
def make_moving_digit_captions(out: str | os.PathLike, *, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """``moving-digits`` with captions (video-LLM): ``txt`` = "the digit 3 moves up and to the left"; the pairs of
    `HELD_OUT_MOTIONS` are kept out of training (see `make_moving_digits`)."""
    return make_moving_digits(out, seed=seed, captions=True, **kwargs)
