"""The ``keywords`` spoken-word dataset (espeak-ng): voice-disjoint splits, balance, audio format, determinism."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from mmblocks.data import (
    ENGLISH_VOICES,
    KEYWORDS,
    VARIANTS,
    EspeakNotFoundError,
    keyword_voice_splits,
    make_dataset,
    make_keywords,
    read_index,
)

SPLITS = ("train", "val", "test")
MISSING = "espeak-ng missing: apt-get install espeak-ng"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason=MISSING)


def _read(folder: Path, split: str) -> list[dict]:
    urls = [str(p) for p in sorted(folder.glob(f"{split}-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def keywords(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip(MISSING)
    out = tmp_path_factory.mktemp("keywords")
    make_dataset("keywords", out, seed=0, clips_per_word=(4, 2, 2), max_count=50, progress=False)
    return out


def test_voice_splits_are_disjoint_and_cover_train():
    splits = keyword_voice_splits(seed=0)
    sets = {s: set(v) for s, v in splits.items()}
    assert sum(len(v) for v in sets.values()) == len(ENGLISH_VOICES) * len(VARIANTS) == 96
    assert {s: len(v) for s, v in sets.items()} == {"train": 68, "val": 14, "test": 14}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        assert not sets[a] & sets[b]
    assert {b for b, _ in sets["train"]} == set(ENGLISH_VOICES) and {v for _, v in sets["train"]} == set(VARIANTS)
    assert keyword_voice_splits(seed=0) == splits and keyword_voice_splits(seed=1) != splits
    with pytest.raises(ValueError, match="voice_fractions"):
        keyword_voice_splits(voice_fractions=(0.5, 0.5, 0.5))


@needs_espeak
def test_index_and_test_voices_never_in_train(keywords):
    index = read_index(keywords)
    assert index.modality == "audio" and index.class_names == list(KEYWORDS) and len(KEYWORDS) >= 20
    assert {k: v.num_samples for k, v in index.splits.items()} == {"train": 80, "val": 40, "test": 40}
    listed = {s: set(v) for s, v in index.dataset["voices"].items()}
    assert not listed["test"] & listed["train"] and not listed["val"] & listed["train"]
    used = {split: {json.loads(s["json"])["voice"] for s in _read(keywords, split)} for split in SPLITS}
    for split in SPLITS:
        assert used[split] <= listed[split]
    assert not used["test"] & used["train"], "a test voice occurs in train"
    assert not used["val"] & used["train"] and not used["test"] & used["val"]
    assert len(used["train"]) > 20  # many voices


@needs_espeak
def test_balanced_transcripts_and_audio_format(keywords):
    index = read_index(keywords)
    assert index.splits["train"].extensions == ["cls", "flac", "json", "txt"]
    for split, per_word in zip(SPLITS, (4, 2, 2)):
        samples = _read(keywords, split)
        labels = np.array([int(s["cls"]) for s in samples])
        assert np.array_equal(np.bincount(labels, minlength=20), np.full(20, per_word))
        for s in samples:
            meta = json.loads(s["json"])
            word = s["txt"].decode()
            assert word == meta["word"] == KEYWORDS[int(s["cls"])]
            info = sf.info(io.BytesIO(s["flac"]))
            assert info.format == "FLAC" and info.subtype == "PCM_16"
            assert info.samplerate == 16000 and info.channels == 1
            audio, rate = sf.read(io.BytesIO(s["flac"]), dtype="float32")
            assert rate == 16000 and audio.ndim == 1
            assert 0.1 < len(audio) / 16000 <= 1.5 and meta["duration"] == pytest.approx(len(audio) / 16000, abs=1e-6)
            assert np.abs(audio).max() > 0.05  # speech, not silence
            assert meta["voice"] == (
                f"{meta['base_voice']}+{meta['variant']}" if meta["variant"] else meta["base_voice"]
            )
            assert 130 <= meta["speed"] <= 210 and 25 <= meta["pitch"] <= 75 and not meta["truncated"]
    durations = [json.loads(s["json"])["duration"] for split in SPLITS for s in _read(keywords, split)]
    assert len(set(durations)) > 20  # natural, variable lengths (no padding)


@needs_espeak
def test_reproducible_from_seed(tmp_path):
    kw = dict(words=("yes", "no", "seven"), clips_per_word=(2, 1, 1), progress=False)
    make_keywords(tmp_path / "a", seed=5, **kw)
    make_keywords(tmp_path / "b", seed=5, **kw)
    make_keywords(tmp_path / "c", seed=6, **kw)
    for path in sorted((tmp_path / "a").glob("*.tar")):
        assert (tmp_path / "b" / path.name).read_bytes() == path.read_bytes()
    a = {s["__key__"]: json.loads(s["json"]) for s in _read(tmp_path / "a", "train")}
    c = {s["__key__"]: json.loads(s["json"]) for s in _read(tmp_path / "c", "train")}
    assert a.keys() == c.keys() and a != c


@needs_espeak
def test_bad_voices_and_missing_espeak(tmp_path):
    with pytest.raises(ValueError, match="no voice/variant"):
        make_keywords(tmp_path / "a", variants=("", "m1", "not-a-variant"), clips_per_word=(1, 1, 1), progress=False)
    with pytest.raises(ValueError, match="no voice/variant"):
        make_keywords(tmp_path / "b", voices=("en-us", "en-xx"), clips_per_word=(1, 1, 1), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_espeak_names_the_apt_package(tmp_path):
    with pytest.raises(EspeakNotFoundError, match="apt-get install espeak-ng"):
        make_keywords(tmp_path, binary="espeak-ng-not-installed", progress=False)
    assert issubclass(EspeakNotFoundError, FileNotFoundError)  # the CLI reports it as an error, exit 2
