"""``keywords``: a small spoken-keyword set synthesised offline with espeak-ng, with held-out voices for testing.

``mmblocks shards make keywords --out DIR`` calls `make_keywords`. espeak-ng is a Debian package
(``apt-get install espeak-ng``); nothing is downloaded at run time.

* Words (classes): the 20 core words of Speech Commands (`KEYWORDS`: yes no up down left right on off stop go
  zero .. nine), class ids in that order.
* Voices: every combination of an English base voice (`ENGLISH_VOICES`, 8 accents: en-us, en-gb, en-gb-scotland,
  en-gb-x-gbclan, en-gb-x-rp, en-gb-x-gbcwmd, en-029, en-us-nyc) and a variant (`VARIANTS`: the plain voice,
  ``+m1`` .. ``+m7``, ``+f1`` .. ``+f4``): 96 voices. Each clip also draws a speed (``-s``, words per minute,
  uniform integer in `speed_range`, default 130..210) and a pitch (``-p``, 0..99 scale, default 25..75).
* Split (by voice): the voice combinations are permuted with `seed` and cut by `voice_fractions` (default
  0.7/0.15/0.15: 68 train, 14 val, 14 test voices); **val and test voices never occur in training** (nor test voices
  in val). The permutation is redrawn until every base voice and every variant occurs in train, so a test voice is
  an unseen combination of an accent and a voice variant that training has heard separately. The lists are in
  ``index.json["dataset"]["voices"]``; each clip's voice is in its ``json``.
* Audio: espeak-ng's 22050 Hz wav (``--stdout``) is trimmed to the speech (from the first to the last sample whose
  magnitude reaches 1 % of the clip's peak, plus `margin` seconds each side, default 0.02 s), resampled to 16 kHz
  with `torchaudio.functional.resample`, and stored as mono 16-bit FLAC. Natural lengths are kept (about
  0.2..0.95 s): no padding; a clip longer than `max_seconds` (1.5 s) would be cut at the end (``"truncated"`` in
  its ``json``; it does not happen with the defaults).

Each sample: ``flac``, ``cls`` the word index, ``txt`` the word (the transcript, so the shards also serve ASR),
``json`` ``{"word", "voice" ("en-gb-scotland+f3"), "base_voice", "variant", "speed", "pitch", "duration",
"sample_rate", "seed", "truncated"}``. Classes are balanced (`clips_per_word` per split). espeak-ng runs as one
subprocess per clip on a thread pool. Deterministic given `seed` (same espeak-ng version: the same bytes).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import MMBlocksError
from .registry import register_dataset
from .shards import write_shards

__all__ = [
    "ENGLISH_VOICES",
    "KEYWORDS",
    "VARIANTS",
    "EspeakNotFoundError",
    "available_voices",
    "keyword_voice_splits",
    "make_keywords",
    "synthesize",
]

SPLITS = ("train", "val", "test")
SAMPLE_RATE = 16_000

#: The 20 core words of Speech Commands (v2), in class-id order.
KEYWORDS = (
    "yes",
    "no",
    "up",
    "down",
    "left",
    "right",
    "on",
    "off",
    "stop",
    "go",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
#: espeak-ng's English voices that need no MBROLA data (``espeak-ng --voices=en``, ``gmw/`` files).
ENGLISH_VOICES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
#: Voice variants (``espeak-ng --voices=variant``, files ``!v/<name>``); ``""`` is the base voice as is.
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")


class EspeakNotFoundError(MMBlocksError, FileNotFoundError):
    """espeak-ng is not installed (``apt-get install espeak-ng``)."""


def _espeak(binary: str = "espeak-ng") -> str:
    path = shutil.which(binary)
    if path is None:
        raise EspeakNotFoundError(
            f"{binary!r} was not found on PATH; the keywords dataset synthesises speech with espeak-ng: install it "
            "with `apt-get install espeak-ng` (Debian/Ubuntu package espeak-ng)"
        )
    return path


@lru_cache(maxsize=4)
def available_voices(binary: str = "espeak-ng") -> tuple[frozenset[str], frozenset[str]]:
    """The English voice names (``espeak-ng --voices=en``, language column) and variant names (``--voices=variant``,
    file ``!v/<name>``) this espeak-ng knows."""
    exe = _espeak(binary)

    def table(arg: str) -> list[list[str]]:
        text = subprocess.run([exe, f"--voices={arg}"], capture_output=True, text=True, check=True).stdout
        return [line.split() for line in text.splitlines()[1:] if line.strip()]

    voices = frozenset(row[1] for row in table("en") if len(row) >= 5 and not row[4].startswith("mb/"))
    variants = frozenset(row[4][3:] for row in table("variant") if len(row) >= 5 and row[4].startswith("!v/"))
    return voices, variants


def _voice_name(base: str, variant: str) -> str:
    return f"{base}+{variant}" if variant else base


def keyword_voice_splits(
    voices: Sequence[str] = ENGLISH_VOICES,
    variants: Sequence[str] = VARIANTS,
    *,
    seed: int = 0,
    voice_fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> dict[str, list[tuple[str, str]]]:
    """(base voice, variant) combinations per split, disjoint: the combinations permuted with `seed`; the first
    ``round(test * n)`` go to test, the next ``round(val * n)`` to val, the rest to train. The permutation is redrawn
    (next seed in the stream, up to 1000 times) until every base voice and every variant occurs in train."""
    fractions = [float(f) for f in voice_fractions]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"voice_fractions must be three non-negative numbers summing to 1: {voice_fractions}")
    combos = [(b, v) for b in voices for v in variants]
    if len(set(combos)) != len(combos):
        raise ValueError(f"voices and variants must be distinct: {list(voices)}, {list(variants)}")
    n = len(combos)
    n_test, n_val = round(fractions[2] * n), round(fractions[1] * n)
    if n_test + n_val >= n:
        raise ValueError(f"{n} voices leave none for train with voice_fractions {fractions}")
    rng = np.random.default_rng([seed, 7])
    for _ in range(1000):
        perm = [combos[i] for i in rng.permutation(n)]
        train = perm[n_test + n_val :]
        if {b for b, _ in train} == set(voices) and {v for _, v in train} == set(variants):
            break
    else:  # pragma: no cover - only with very few training voices
        raise ValueError(f"cannot keep every voice and variant in train with {len(train)} training voices")
    return {"train": sorted(train), "val": sorted(perm[n_test : n_test + n_val]), "test": sorted(perm[:n_test])}


def check_voice_options(
    voices: Sequence[str],
    variants: Sequence[str],
    speed_range: Sequence[int],
    pitch_range: Sequence[int],
    binary: str = "espeak-ng",
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Refuse voices / variants espeak-ng lacks and speed / pitch ranges it cannot take; returns the two ranges."""
    known_voices, known_variants = available_voices(binary)
    missing = [v for v in voices if v not in known_voices] + [
        f"+{v}" for v in variants if v and v not in known_variants
    ]
    if missing:
        raise ValueError(
            f"espeak-ng has no voice/variant {missing} (English voices: {', '.join(sorted(known_voices))}; "
            "variants: espeak-ng --voices=variant)"
        )
    s_lo, s_hi = (int(v) for v in speed_range)
    p_lo, p_hi = (int(v) for v in pitch_range)
    if not (80 <= s_lo <= s_hi <= 450 and 0 <= p_lo <= p_hi <= 99):
        raise ValueError(f"speed_range must lie in 80..450 and pitch_range in 0..99: {speed_range}, {pitch_range}")
    return (s_lo, s_hi), (p_lo, p_hi)


def write_spoken_split(
    pool: ThreadPoolExecutor,
    jobs: Sequence[tuple[str, str, dict[str, Any], dict[str, Any]]],
    out: str | os.PathLike,
    split: str,
    *,
    margin: float,
    max_seconds: float,
    binary: str,
    **shard_options: Any,
) -> dict[str, Any]:
    """Synthesise ``(key, text, meta, fields)`` jobs on `pool` (``meta`` holds ``voice``, ``speed``, ``pitch`` and
    whatever else the sample's ``json`` keeps) and write them as `split`: each sample gets ``flac``, its ``fields``
    and ``json`` = meta + the audio info. Synthesis runs lazily in order, overlapping the writing."""

    def synth(job: tuple[str, str, dict[str, Any], dict[str, Any]]) -> tuple[bytes, dict[str, Any]]:
        text, meta = job[1], job[2]
        return synthesize(
            text,
            meta["voice"],
            speed=meta["speed"],
            pitch=meta["pitch"],
            margin=margin,
            max_seconds=max_seconds,
            binary=binary,
        )

    audio = pool.map(synth, jobs)
    samples = (
        {"__key__": key, "flac": flac, **fields, "json": {**meta, **info}}
        for (key, _, meta, fields), (flac, info) in zip(jobs, audio)
    )
    return write_shards(samples, out, split, modality="audio", total=len(jobs), **shard_options)


def _trim(x: np.ndarray, rate: int, margin: float) -> np.ndarray:
    """From the first to the last sample with ``|x| >= 1 %`` of the peak, plus `margin` seconds each side."""
    mag = np.abs(x)
    peak = float(mag.max()) if len(mag) else 0.0
    if peak <= 0:
        return x
    loud = np.flatnonzero(mag >= 0.01 * peak)
    pad = round(margin * rate)
    return x[max(0, loud[0] - pad) : min(len(x), loud[-1] + 1 + pad)]


def synthesize(
    word: str,
    voice: str,
    *,
    speed: int = 175,
    pitch: int = 50,
    margin: float = 0.02,
    max_seconds: float = 1.5,
    binary: str = "espeak-ng",
) -> tuple[bytes, dict[str, Any]]:
    """Speak `word` with espeak-ng; mono 16 kHz 16-bit FLAC bytes (trimmed, see the module docstring) and
    ``{"duration", "sample_rate", "truncated"}``."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    exe = _espeak(binary)
    cmd = [exe, "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "--stdout", word]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')}")
    wav, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    wav = _trim(wav.mean(axis=1), rate, margin)
    audio = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), rate, SAMPLE_RATE).numpy()
    limit = round(max_seconds * SAMPLE_RATE)
    truncated = len(audio) > limit
    audio = np.clip(audio[:limit], -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue(), {
        "duration": round(len(audio) / SAMPLE_RATE, 6),
        "sample_rate": SAMPLE_RATE,
        "truncated": truncated,
    }


@register_dataset("keywords")
def make_keywords(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    words: Sequence[str] = KEYWORDS,
    voices: Sequence[str] = ENGLISH_VOICES,
    variants: Sequence[str] = VARIANTS,
    voice_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    clips_per_word: Sequence[int] = (100, 20, 20),
    speed_range: Sequence[int] = (130, 210),
    pitch_range: Sequence[int] = (25, 75),
    margin: float = 0.02,
    max_seconds: float = 1.5,
    workers: int | None = None,
    binary: str = "espeak-ng",
    max_count: int = 1000,
    max_bytes: int | str = 1_000_000_000,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the ``keywords`` dataset (module docstring: words, voices, the voice-disjoint split, trimming) to `out`.

    Defaults: 20 words x 100/20/20 clips for train/val/test (2800 clips, ~34 MB, ~25 s on 2 cores), 96 voices.
    Every clip of split s, word w, number j draws its voice (uniform over the split's voices), speed and pitch from
    ``np.random.default_rng([seed, s, w, j])``. `workers` espeak-ng processes run at once (default 2 per core).
    Raises `EspeakNotFoundError` when espeak-ng is missing, ValueError for a voice or variant it does not have.
    Returns the index contents.
    """
    words = [str(w).strip() for w in words]
    if len(set(words)) != len(words) or not all(words):
        raise ValueError(f"words must be distinct non-empty strings: {words}")
    if len(clips_per_word) != 3 or any(int(c) < 0 for c in clips_per_word):
        raise ValueError(f"clips_per_word must be three non-negative counts (train, val, test): {clips_per_word}")
    (s_lo, s_hi), (p_lo, p_hi) = check_voice_options(voices, variants, speed_range, pitch_range, binary)
    splits = keyword_voice_splits(voices, variants, seed=seed, voice_fractions=voice_fractions)
    counts = dict(zip(SPLITS, (int(c) for c in clips_per_word)))
    description = {
        "name": "keywords",
        "source": "espeak-ng speech synthesis (apt-get install espeak-ng)",
        "seed": seed,
        "words": words,
        "clips_per_word": counts,
        "sample_rate": SAMPLE_RATE,
        "speed_range": [s_lo, s_hi],
        "pitch_range": [p_lo, p_hi],
        "trim": f"1% of peak, margin {margin} s; no padding; cut at {max_seconds} s",
        "split_policy": "by voice: (base voice, variant) combinations disjoint between train, val and test",
        "voices": {split: [_voice_name(b, v) for b, v in splits[split]] for split in SPLITS},
    }
    command = command or f"mmblocks shards make keywords --out {out} --seed {seed}"
    workers = workers or 2 * (os.cpu_count() or 1)
    result: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s, split in enumerate(SPLITS):
            if counts[split] == 0:
                continue
            clips = []
            for w, word in enumerate(words):
                for j in range(counts[split]):
                    rng = np.random.default_rng([seed, s, w, j])
                    base, variant = splits[split][int(rng.integers(len(splits[split])))]
                    speed, pitch = int(rng.integers(s_lo, s_hi + 1)), int(rng.integers(p_lo, p_hi + 1))
                    meta = {
                        "word": word,
                        "voice": _voice_name(base, variant),
                        "base_voice": base,
                        "variant": variant,
                        "speed": speed,
                        "pitch": pitch,
                        "seed": [seed, s, w, j],
                    }
                    clips.append((f"{word}-{split}-{j:05d}", w, meta))
            order = np.random.default_rng([seed, 1000 + s]).permutation(len(clips))
            clips = [clips[i] for i in order]

            jobs = [(key, meta["word"], meta, {"cls": w, "txt": meta["word"]}) for key, w, meta in clips]
            result = write_spoken_split(
                pool,
                jobs,
                out,
                split,
                margin=margin,
                max_seconds=max_seconds,
                binary=binary,
                max_count=max_count,
                max_bytes=max_bytes,
                class_names=words,
                command=command,
                dataset=description,
                progress=progress,
                overwrite=True,  # make_dataset refused an existing dataset unless asked to replace it
            )
    return result
