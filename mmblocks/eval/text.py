"""Corpus-level text metrics, computed as the field's reference tools compute them.

* `wer` / `cer`: total edit operations over total reference words / characters (``jiwer.wer`` / ``jiwer.cer`` on the
  same strings; spaces count as characters for CER).
* `bleu`: corpus BLEU-1..4 with the closest reference length (``pycocoevalcap``'s ``Bleu``, the COCO caption tool).
* `cider`: CIDEr-D (``pycocoevalcap``'s ``Cider``: tf-idf n-gram vectors with document frequencies over the references,
  clipped hypothesis counts, a Gaussian length penalty with sigma 6, times 10).

Captions are compared on pre-tokenised text (words separated by spaces); `normalize_text` is the normalisation the
recipes apply first (lower case, punctuation removed, spaces collapsed).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu", "cer", "cider", "edit_distance", "exact_match", "normalize_text", "wer"]

_PUNCT = re.compile(r"[^\w\s']")


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed (apostrophes kept), whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1) between two sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _check(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses: give one hypothesis per reference")


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate: word edits summed over the corpus / reference words summed."""
    _check(references, hypotheses)
    refs = [r.split() for r in references]
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("the references hold no words; WER is undefined")
    return sum(edit_distance(r, h.split()) for r, h in zip(refs, hypotheses)) / total


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus character error rate (spaces are characters): character edits summed / reference characters summed."""
    _check(references, hypotheses)
    refs = [" ".join(r.split()) for r in references]
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("the references hold no characters; CER is undefined")
    return sum(edit_distance(r, " ".join(h.split())) for r, h in zip(refs, hypotheses)) / total


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """The fraction of hypotheses equal to their reference after `normalize_text`."""
    _check(references, hypotheses)
    if not references:
        raise ValueError("no references")
    return sum(normalize_text(r) == normalize_text(h) for r, h in zip(references, hypotheses)) / len(references)


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(references: Sequence[Sequence[str]], hypotheses: Sequence[str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (``[B1, ..., Bn]``); each hypothesis has one or more references."""
    _check(references, hypotheses)
    small, tiny = 1e-9, 1e-15  # as the COCO tool: a zero count still gives a finite (zero) score
    guess, correct = [0] * n, [0] * n
    test_len = ref_len = 0
    for refs, hyp in zip(references, hypotheses):
        words = hyp.split()
        max_counts: Counter = Counter()
        lengths = []
        for ref in refs:
            ref_words = ref.split()
            lengths.append(len(ref_words))
            for gram, count in _ngrams(ref_words, n).items():
                max_counts[gram] = max(max_counts[gram], count)
        test_len += len(words)
        ref_len += min((abs(length - len(words)), length) for length in lengths)[1]
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        for k in range(n):
            guess[k] += max(0, len(words) - k)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider(references: Sequence[Sequence[str]], hypotheses: Sequence[str], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean over samples of the per-sample score (see the module docstring)."""
    _check(references, hypotheses)
    if not references:
        raise ValueError("no references")
    refs = [[_ngrams(r.split(), n) for r in rs] for rs in references]
    frequency: Counter = Counter()
    for sample in refs:
        frequency.update({gram for counts in sample for gram in counts})
    log_docs = math.log(float(len(refs)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            value = float(tf) * (log_docs - math.log(max(1.0, frequency[gram])))
            vec[k][gram] = value
            norm[k] += value * value
            if k == 1:  # the COCO tool's "length" counts bigrams; kept for equal scores
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for sample, hyp in zip(refs, hypotheses):
        vh, nh, lh = vector(_ngrams(hyp.split(), n))
        total = [0.0] * n
        for counts in sample:
            vr, nr, lr = vector(counts)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(v, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, v in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(sample) * 10.0)
    return sum(scores) / len(scores)
