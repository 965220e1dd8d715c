"""The final report of a run: ``report/report.json``, ``report/report.md`` and PNG curves from ``metrics.jsonl``.

::

    run_dir/report/
      report.json      # {"title", "created", "summary", "final": {split: {metric: v}}, "best": {...}, "metrics": {...}}
      report.md        # run highlights, a table of final and best metrics, the curves
      loss.png         # one PNG per metric group that exists: loss, accuracy, lr, throughput, timing
      ...

"Best" is the minimum for loss-like metrics (loss, error, perplexity, mse, mae, nll) and the maximum for score-like
ones (acc, top1, recall, precision, f1, auc, map, iou, bleu, r@k); other metrics (lr, samples/s, ...) get only
final/min/max. When a resumed run logged steps again, the later records replace the earlier ones from that step on.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .logging import METRICS_FILE, read_metrics

__all__ = [
    "REPORT_DIR",
    "compare_runs_table",
    "metric_mode",
    "metric_series",
    "summarize_metrics",
    "write_report",
]

REPORT_DIR = "report"
_RESERVED = ("step", "split", "time")
_MIN_RE = re.compile(r"loss|error|perplexity|ppl|mse|mae|nll|(^|[^a-z])[wc]er($|[^a-z])")
_MAX_RE = re.compile(r"acc|top\d|recall|precision|f1|auc|(^|[^a-z])map($|[^a-z])|iou|bleu|r@\d")

Series = dict[tuple[str, str], list[tuple[int, float]]]


def metric_mode(name: str) -> str | None:
    """``"min"`` for loss-like names, ``"max"`` for accuracy-like names, ``None`` when "best" has no meaning."""
    n = name.lower()
    if _MIN_RE.search(n):
        return "min"
    if _MAX_RE.search(n):
        return "max"
    return None


def _json_safe(obj: Any) -> Any:
    """A JSON-serialisable copy: numpy/tensor scalars become numbers, non-finite floats ``None``, others ``str``."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=str) if isinstance(obj, set | frozenset) else obj
        return [_json_safe(v) for v in items]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays/scalars, tensors
        try:
            return _json_safe(obj.tolist())
        except Exception:  # fall back to the text form
            pass
    return str(obj)


def metric_series(records: Sequence[Mapping[str, Any]]) -> Series:
    """``{(split, metric): [(step, value), ...]}`` in step order from ``metrics.jsonl`` records.

    If a split's step goes backwards (a run resumed from an older checkpoint), that split's records from the new
    step on are dropped before the new ones are added; for a repeated (split, metric, step) the last value wins.
    """
    per_split: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        split = str(rec.get("split", "train"))
        step = int(rec.get("step", 0))
        recs = per_split.setdefault(split, [])
        if recs and step < int(recs[-1].get("step", 0)):
            while recs and int(recs[-1].get("step", 0)) >= step:
                recs.pop()
        recs.append(rec)
    series: Series = {}
    for split, recs in per_split.items():
        points: dict[str, dict[int, float]] = {}
        for rec in recs:
            for name, value in rec.items():
                if name in _RESERVED or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                points.setdefault(name, {})[int(rec["step"])] = float(value)
        for name, by_step in points.items():
            series[(split, name)] = sorted(by_step.items())
    return series


def summarize_metrics(
    records: Sequence[Mapping[str, Any]], *, modes: Mapping[str, str | None] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{split: {metric: {"final", "final_step", "best", "best_step", "mode", "min", "max", "count"}}}``.

    ``best``/``best_step`` are present when the metric has a mode (from ``modes`` or :func:`metric_mode`); ties
    go to the earliest step. Non-finite values are skipped for best/min/max and kept as ``final`` (JSON ``null``).
    """
    modes = dict(modes or {})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (split, name), points in sorted(metric_series(records).items()):
        finite = [(s, v) for s, v in points if math.isfinite(v)]
        mode = modes.get(name, metric_mode(name))
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode for {name!r} must be 'min', 'max' or None, got {mode!r}")
        entry: dict[str, Any] = {
            "final": points[-1][1],
            "final_step": points[-1][0],
            "mode": mode,
            "min": min(v for _, v in finite) if finite else None,
            "max": max(v for _, v in finite) if finite else None,
            "count": len(points),
        }
        if mode is not None:
            if finite:
                sign = 1.0 if mode == "min" else -1.0
                best_step, best = min(finite, key=lambda sv: (sign * sv[1], sv[0]))
            else:
                best_step, best = None, None
            entry["best"], entry["best_step"] = best, best_step
        out.setdefault(split, {})[name] = entry
    return out


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------

_PLOT_GROUPS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("loss", "Loss", lambda n: "loss" in n),
    ("accuracy", "Accuracy", lambda n: metric_mode(n) == "max"),
    ("lr", "Learning rate", lambda n: n == "lr" or n.startswith(("lr_", "lr/", "lr.")) or "learning_rate" in n),
    ("throughput", "Throughput (per second)", lambda n: "per_s" in n or n.endswith("/s") or "throughput" in n),
    ("timing", "Time per step (s)", lambda n: n in ("data_time", "step_time")),
]


def _group_of(name: str) -> str | None:
    n = name.lower()
    for key, _, match in _PLOT_GROUPS:
        if match(n):
            return key
    return None


def _ema(values: list[float], smoothing: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard-style smoothing), skipping non-finite values."""
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            acc = smoothing * acc + (1 - smoothing) * v
            weight = smoothing * weight + (1 - smoothing)
        out.append(acc / weight if weight > 0 else math.nan)
    return out


def _plot_groups(series: Series, out_dir: Path, *, dpi: int = 110) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grouped: dict[str, list[tuple[str, str]]] = {}
    for split, name in sorted(series):
        group = _group_of(name)
        if group is not None:
            grouped.setdefault(group, []).append((split, name))

    written = []
    for key, label, _ in _PLOT_GROUPS:
        if key not in grouped:
            continue
        fig = Figure(figsize=(7.0, 4.0), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        positive = []
        for split, name in grouped[key]:
            steps = [s for s, _ in series[(split, name)]]
            values = [v for _, v in series[(split, name)]]
            positive.extend(v for v in values if math.isfinite(v))
            line_label = f"{split}/{name}"
            if key != "lr" and len(values) >= 100:  # noisy curves: raw (faint) plus an EMA over ~2% of the run
                (raw,) = ax.plot(steps, values, alpha=0.3, linewidth=0.8)
                smoothed = _ema(values, smoothing=1.0 - 50.0 / len(values))
                ax.plot(steps, smoothed, color=raw.get_color(), linewidth=1.6, label=f"{line_label} (smoothed)")
            else:
                ax.plot(steps, values, marker="o", markersize=3, linewidth=1.4, label=line_label)
        if key == "loss" and positive and min(positive) > 0 and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, format="png")
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _fmt(value: Any, floatfmt: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, floatfmt) if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple | Mapping):
        text = json.dumps(_json_safe(value))
        value = text if len(text) <= 80 else text[:77] + "..."
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _lookup(row: Mapping[str, Any], key: str) -> Any:
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def compare_runs_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str | tuple[str, str]],
    *,
    best: Mapping[str, str] | None = None,
    floatfmt: str = ".4g",
) -> str:
    """A markdown table with one line per run (e.g. arms baseline / +frozen block / +random block).

    Args:
        rows: one mapping per run. A column key is looked up as is, then as a dotted path into nested mappings
            (``"best.val.acc"``).
        columns: keys, or ``(key, header)`` pairs.
        best: ``{column key: "max" | "min"}``: the best value of that column is written in bold.
        floatfmt: format spec for floats.

    Missing values print as ``-``; numeric columns are right-aligned.
    """
    cols = [(c, c) if isinstance(c, str) else (str(c[0]), str(c[1])) for c in columns]
    if not cols:
        raise ValueError("compare_runs_table needs at least one column")
    best = dict(best or {})
    for key, mode in best.items():
        if mode not in ("min", "max"):
            raise ValueError(f"best[{key!r}] must be 'min' or 'max', got {mode!r}")
    values = [[_lookup(row, key) for key, _ in cols] for row in rows]

    winners: dict[int, float] = {}
    for j, (key, _) in enumerate(cols):
        if key in best:
            nums = [v[j] for v in values if _is_number(v[j]) and math.isfinite(v[j])]
            if nums:
                winners[j] = max(nums) if best[key] == "max" else min(nums)

    header = "| " + " | ".join(_fmt(h) for _, h in cols) + " |"
    aligns = []
    for j in range(len(cols)):
        present = [v[j] for v in values if v[j] is not None]
        aligns.append("---:" if present and all(_is_number(x) for x in present) else "---")
    lines = [header, "|" + "|".join(aligns) + "|"]
    for v in values:
        cells = []
        for j, x in enumerate(v):
            text = _fmt(x, floatfmt)
            if j in winners and _is_number(x) and x == winners[j]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown(
    report: dict[str, Any], metrics_file: Path | None, plots: list[Path], sections: Sequence[tuple[str, str]] = ()
) -> str:
    lines = [f"# {report['title']}", ""]
    source = f"`{metrics_file.name}` ({report['num_records']} records)" if metrics_file else "no metrics file"
    lines += [f"Generated {report['created']} from {source}.", ""]

    flat = _flatten(report["summary"])
    if flat:
        table = compare_runs_table([{"k": k, "v": v} for k, v in flat.items()], [("k", "key"), ("v", "value")])
        lines += ["## Run", "", table]
    rows = []
    for split, metrics in report["metrics"].items():
        for name, e in metrics.items():
            rows.append(
                {
                    "split": split,
                    "metric": name,
                    "final": e["final"],
                    "final_step": e["final_step"],
                    "best": e.get("best"),
                    "best_step": e.get("best_step"),
                    "goal": e["mode"],
                    "min": e["min"],
                    "max": e["max"],
                }
            )
    if rows:
        lines += [
            "## Metrics",
            "",
            compare_runs_table(
                rows,
                [
                    ("split", "split"),
                    ("metric", "metric"),
                    ("final", "final"),
                    ("final_step", "at step"),
                    ("best", "best"),
                    ("best_step", "at step"),
                    ("goal", "goal"),
                    ("min", "min"),
                    ("max", "max"),
                ],
            ),
        ]
    if plots:
        lines += ["## Curves", ""]
        titles = {key: label for key, label, _ in _PLOT_GROUPS}
        for p in plots:
            label = titles.get(p.stem, p.stem)
            lines += [f"### {label}", "", f"[![{label}]({p.name})]({p.name})", ""]
    for title, body in sections:
        lines += [f"## {title}", "", body.rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    run_dir: str | os.PathLike,
    *,
    summary: Mapping[str, Any],
    metrics_path: str | os.PathLike | None = None,
    title: str | None = None,
    modes: Mapping[str, str | None] | None = None,
    sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write ``run_dir/report/`` (report.json, report.md, PNG curves) and return that folder.

    Args:
        run_dir: the run folder.
        summary: run highlights for the report (config, parameter counts, arm name, wall time, ...); any values,
            made JSON-safe (non-finite floats become ``null``, unknown objects their ``str``).
        metrics_path: the ``metrics.jsonl`` to summarise and plot; default ``run_dir/metrics.jsonl`` if it exists
            (no metrics tables or curves otherwise). An explicit path that does not exist is an error.
        title: the markdown title (default: the run folder's name).
        modes: per-metric ``"min"``/``"max"``/``None`` overriding the name-based choice of "best".
        sections: extra ``(title, markdown)`` sections for report.md (a task's confusion matrix, ...), in order.
    """
    run_dir = Path(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    if metrics_path is None:
        default = run_dir / METRICS_FILE
        metrics_file = default if default.is_file() else None
    else:
        metrics_file = Path(metrics_path)
        if metrics_file.is_dir():
            metrics_file = metrics_file / METRICS_FILE
        if not metrics_file.is_file():
            raise FileNotFoundError(f"metrics file not found: {metrics_file}")
    records = read_metrics(metrics_file) if metrics_file else []

    for stale in out_dir.glob("*.png"):
        if stale.stem in {key for key, _, _ in _PLOT_GROUPS}:
            stale.unlink()
    plots = _plot_groups(metric_series(records), out_dir) if records else []
    metrics = summarize_metrics(records, modes=modes)
    report = {
        "title": title or run_dir.resolve().name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "metrics_path": str(metrics_file) if metrics_file else None,
        "num_records": len(records),
        "summary": _json_safe(dict(summary)),
        "final": {split: {n: e["final"] for n, e in ms.items()} for split, ms in metrics.items()},
        "best": {split: {n: e["best"] for n, e in ms.items() if "best" in e} for split, ms in metrics.items()},
        "metrics": metrics,
        "plots": [p.name for p in plots],
    }
    report = _json_safe(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(report, metrics_file, plots, sections), encoding="utf-8")
    return out_dir
