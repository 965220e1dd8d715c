"""`DataLedger`: every sample of every epoch accounted for, per split: expected, delivered, trained on, lost by cause.

The trainer adds one entry per split and epoch from the loader's `global_stats` (all ranks summed). Entries go to
``metrics.jsonl`` (split ``data_<split>``), the checkpoint (a resumed run's summary covers the epochs before the
resume), ``summary.json`` (``data``) and the report (a "Data" table).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..data.loader import LOSS_CAUSES

__all__ = ["COUNTS", "DataLedger"]

#: The counts an entry holds: delivered samples, the lost ones (total and by cause), broken shards, drop_last
#: remainders.
COUNTS = ("samples", "lost", *LOSS_CAUSES, "shard_errors", "dropped")


class DataLedger:
    """Per ``(split, epoch)`` entries: ``{"split", "epoch", "expected", "complete", *COUNTS, "trained"}``."""

    def __init__(self, entries: Iterable[Mapping[str, Any]] = ()):
        self.entries: list[dict[str, Any]] = [dict(e) for e in entries]

    def add(self, split: str, epoch: int, stats: Mapping[str, Any], trained: int | None = None) -> dict[str, Any]:
        """Record a loader's `stats` for `split` and `epoch` (replacing an entry for the same pair: a resumed epoch
        is counted once); `trained`: samples the optimizer saw. Returns the entry."""
        entry = {
            "split": split,
            "epoch": int(epoch),
            "expected": stats.get("expected"),
            "complete": bool(stats.get("complete", True)),
            **{k: int(stats.get(k, 0)) for k in COUNTS},
        }
        if trained is not None:
            entry["trained"] = int(trained)
        self.entries = [e for e in self.entries if (e["split"], e["epoch"]) != (split, entry["epoch"])]
        self.entries.append(entry)
        return entry

    def totals(self) -> dict[str, dict[str, int]]:
        """``{split: {count: sum over epochs}}``."""
        out: dict[str, dict[str, int]] = {}
        for e in self.entries:
            t = out.setdefault(e["split"], dict.fromkeys((*COUNTS, "epochs"), 0))
            t["epochs"] += 1
            for k in COUNTS:
                t[k] += e[k]
            if "trained" in e:
                t["trained"] = t.get("trained", 0) + e["trained"]
        return out

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` keeps: totals per split and every entry."""
        return {"totals": self.totals(), "epochs": list(self.entries)}

    @staticmethod
    def describe(entry: Mapping[str, Any]) -> str:
        """One line: ``lost 150 of 1257 train samples in epoch 0 (corrupt 150)``."""
        of = f" of {entry['expected']}" if entry.get("expected") is not None else ""
        causes = ", ".join(f"{k} {entry[k]}" for k in LOSS_CAUSES if entry[k])
        shards = f"; {entry['shard_errors']} unreadable shard(s)" if entry["shard_errors"] else ""
        return f"lost {entry['lost']}{of} {entry['split']} samples in epoch {entry['epoch']} ({causes}{shards})"

    def section(self) -> tuple[str, str]:
        """The report's "Data" section: a markdown table with one row per entry."""
        cols = ("split", "epoch", "expected", "samples", "trained", *COUNTS[1:], "complete")
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for e in self.entries:
            lines.append("| " + " | ".join("-" if e.get(c) is None else str(e[c]) for c in cols) + " |")
        intro = (
            "Every sample of every epoch: `expected` (index.json), `samples` delivered, `trained` (seen by the "
            "optimizer), `lost` = `corrupt` + `missing_key` + `shard_lost`, `shard_errors` (shards that broke), "
            "`dropped` (drop_last remainders)."
        )
        return "Data", intro + "\n\n" + "\n".join(lines)
