"""The ``sentences`` ASR dataset (espeak-ng): transcripts from the grammar, voice-disjoint splits, real audio."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from mmblocks.data import make_dataset, read_index
from mmblocks.data.sentences import TEMPLATES, VOCABULARY, sentence

MISSING = "espeak-ng missing: apt-get install espeak-ng"


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip(MISSING)
    out = tmp_path_factory.mktemp("sentences")
    make_dataset("sentences", out, seed=1, clips=(24, 8, 8), progress=False)
    samples = {
        split: list(wds.WebDataset(sorted(str(p) for p in out.glob(f"{split}-*.tar")), shardshuffle=False))
        for split in ("train", "val", "test")
    }
    return out, samples


def test_grammar_uses_its_vocabulary_and_every_template():
    rng = np.random.default_rng(0)
    drawn = [sentence(rng) for _ in range(600)]
    assert {t for _, t in drawn} == set(TEMPLATES)
    assert {w for text, _ in drawn for w in text.split()} <= set(VOCABULARY)
    assert len(VOCABULARY) > 200
    assert all(text == text.lower() and text.replace(" ", "").isalpha() for text, _ in drawn)


def test_transcripts_voices_and_audio(sentences):
    out, samples = sentences
    index = read_index(out)
    voices = index.dataset["voices"]
    assert not set(voices["train"]) & (set(voices["val"]) | set(voices["test"]))
    assert not set(voices["val"]) & set(voices["test"])
    for split, rows in samples.items():
        assert len(rows) == {"train": 24, "val": 8, "test": 8}[split]
        for row in rows:
            meta = json.loads(row["json"])
            assert row["txt"].decode() == meta["text"] and set(meta["text"].split()) <= set(VOCABULARY)
            assert meta["voice"] in voices[split]
            audio, rate = sf.read(io.BytesIO(row["flac"]))
            assert rate == 16_000 and audio.ndim == 1 and not meta["truncated"]
            words = len(meta["text"].split())
            assert 0.15 * words < len(audio) / rate < 1.0 * words + 1, (meta["text"], len(audio) / rate)
