"""Text metrics equal the field's tools on the same strings: jiwer (WER, CER) and pycocoevalcap (BLEU, CIDEr-D)."""

from __future__ import annotations

import random

import pytest

from mmblocks.eval import bleu, cer, cider, exact_match, normalize_text, wer

jiwer = pytest.importorskip("jiwer")
Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider

WORDS = [
    "a",
    "the",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "left",
    "right",
    "of",
    "is",
    "there",
    "two",
    "three",
    "one",
    "moves",
    "up",
    "down",
    "digit",
]


def _sentences(seed: int, count: int, low: int = 2, high: int = 9) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_wer_and_cer_equal_jiwer(seed):
    refs = _sentences(seed, 40)
    rng = random.Random(seed + 100)
    hyps = []
    for r in refs:  # substitutions, deletions and insertions
        words = r.split()
        out = []
        for w in words:
            roll = rng.random()
            if roll < 0.15:
                continue
            out.append(rng.choice(WORDS) if roll < 0.3 else w)
            if rng.random() < 0.1:
                out.append(rng.choice(WORDS))
        hyps.append(" ".join(out))
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_bleu_and_cider_equal_pycocoevalcap(seed):
    refs = [_sentences(seed * 10 + i, random.Random(i).randint(1, 4)) for i in range(30)]
    hyps = _sentences(seed + 1000, 30, low=1)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    expected, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert bleu(refs, hyps) == pytest.approx(expected, abs=1e-12)
    expected_cider, _ = Cider().compute_score(gts, res)
    assert cider(refs, hyps) == pytest.approx(float(expected_cider), abs=1e-9)


def test_exact_match_normalises_case_and_punctuation():
    assert normalize_text("  Two RED circles. ") == "two red circles"
    assert exact_match(["two", "Red!", "left"], ["Two", "red", "right"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        wer(["a b"], [])
