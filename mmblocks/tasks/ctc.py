"""CTC speech recognition: a `CTCHead` over the encoder's time tokens, trained on the ``txt`` transcripts, evaluated by
corpus WER and CER (`mmblocks.eval`, equal to jiwer) on greedy transcriptions — the LLM-free ASR baseline arm."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..eval import cer, normalize_text, wer
from ..heads import CharVocab
from ..heads.ctc import ctc_loss, greedy_decode
from .base import Metrics, StepOutput, Task, all_gather_rows, all_reduce_sum_
from .registry import register_task

__all__ = ["CTCMetrics", "CTCTask"]

#: Lower-case letters, space and apostrophe: what `normalize_text` leaves of English transcripts.
DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz '"


class CTCMetrics(Metrics):
    """Transcriptions and references of the split (gathered across ranks at `sync`), the summed loss; `compute`
    gives corpus ``wer``, ``cer``, ``loss`` and ``samples``; `report` writes ``predictions_{split}.jsonl``."""

    def __init__(self, vocab: CharVocab, device: torch.device, examples: int = 8):
        self.vocab, self.examples = vocab, examples
        self.rows: list[dict[str, str]] = []
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, samples

    def update(self, output: Any, batch: Any) -> None:
        log_probs, lengths = output
        refs = [normalize_text(t) for t in batch.field("txt")]
        targets = [self.vocab.encode(r) for r in refs]
        self.totals[0] += ctc_loss(log_probs, lengths, targets).detach().double() * len(refs)
        self.totals[1] += len(refs)
        hyps = [self.vocab.decode(ids) for ids in greedy_decode(log_probs, lengths)]
        self.rows += [{"key": k, "reference": r, "prediction": h} for k, r, h in zip(batch.key, refs, hyps)]

    def sync(self) -> None:
        self.rows = all_gather_rows(self.rows)
        all_reduce_sum_([self.totals])

    def compute(self) -> dict[str, float]:
        loss, n = self.totals.tolist()
        if n == 0 or not self.rows:
            return {"loss": float("nan"), "wer": float("nan"), "cer": float("nan"), "samples": 0}
        refs = [r["reference"] for r in self.rows]
        hyps = [r["prediction"] for r in self.rows]
        return {"loss": loss / n, "wer": wer(refs, hyps), "cer": cer(refs, hyps), "samples": int(n)}

    def report(self, out_dir: Path, split: str) -> list[tuple[str, str]]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"predictions_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        lines = ["| key | reference | prediction |", "|---|---|---|"]
        lines += [f"| {r['key']} | {r['reference']} | {r['prediction']} |" for r in self.rows[: self.examples]]
        return [(f"Transcriptions ({split})", f"All in [{path.name}]({path.name}).\n\n" + "\n".join(lines) + "\n")]


@register_task("ctc")
class CTCTask(Task):
    """Learn the ``txt`` transcript of each sample with CTC over a character alphabet (``model.head`` ``ctc``).

    Args:
        alphabet: the characters the head predicts (blank is added); transcripts are normalised with
            `mmblocks.eval.normalize_text` first, and a character outside the alphabet is an error naming it.
        examples: transcriptions shown in the report.
    """

    fields = ("txt",)
    default_head = "ctc"
    monitor = ("wer", "min")

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, examples: int = 8):
        self.vocab = CharVocab(alphabet)
        self.examples = int(examples)

    def build_head(self, in_dim: int, name: str | None = None, **kwargs: Any):
        return super().build_head(in_dim, name, vocab_size=len(self.vocab), **kwargs)

    def targets(self, batch: Any) -> list[list[int]]:
        return [self.vocab.encode(normalize_text(t)) for t in batch.field("txt")]

    def training_step(self, model: Callable[..., Any], batch: Any) -> StepOutput:
        targets = self.targets(batch)
        (log_probs, lengths), aux = self.forward(model, batch)
        loss = ctc_loss(log_probs, lengths, targets)
        total = loss + aux if isinstance(aux, torch.Tensor) else loss
        return StepOutput(total, {"loss": loss.detach()}, len(targets))

    def new_metrics(self, device: torch.device) -> CTCMetrics:
        return CTCMetrics(self.vocab, device, self.examples)

    def extra_repr(self) -> str:
        return f"alphabet={''.join(self.vocab.chars)!r}"
