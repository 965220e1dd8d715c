"""Metrics logging (JSONL + TensorBoard), the step timer, and the final report (JSON, markdown, PNG curves)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmblocks.train.logging import MetricsLogger, StepTimer, read_metrics
from mmblocks.train.report import compare_runs_table, metric_mode, metric_series, summarize_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------------
# MetricsLogger
# ----------------------------------------------------------------------------------------------------------------


def test_jsonl_lines_hold_what_was_logged(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 2.5, "lr": torch.tensor(1e-3), "acc": np.float32(0.25)})
        log.log(1, {"loss": 3.0, "acc": 0.5}, split="val")
        # flushed line by line: readable before close
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
        log.log(2, {"loss": float("nan"), "grad_norm": float("inf")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    raw = [json.loads(line) for line in lines]  # strict JSON: no bare NaN
    assert raw[0]["step"] == 1 and raw[0]["split"] == "train" and raw[0]["loss"] == 2.5
    assert raw[0]["lr"] == pytest.approx(1e-3) and raw[0]["acc"] == 0.25 and isinstance(raw[0]["time"], float)
    assert raw[1]["split"] == "val" and raw[1]["acc"] == 0.5
    assert raw[2]["loss"] == "NaN" and "NaN" not in lines[2].replace('"NaN"', "")
    recs = read_metrics(tmp_path)
    assert math.isnan(recs[2]["loss"]) and recs[2]["grad_norm"] == math.inf
    assert [r["split"] for r in read_metrics(tmp_path / "metrics.jsonl", split="val")] == ["val"]
    assert not (tmp_path / "tensorboard").exists()


def test_append_on_resume_and_torn_last_line(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(2, {"loss": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "spl')  # killed mid-write
    with pytest.warns(UserWarning, match="truncated"):
        recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]


def test_bad_metrics_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 1.0})
        with pytest.raises(ValueError, match="scalar"):
            log.log(1, {"loss": torch.ones(2)})
        with pytest.raises(TypeError, match="number"):
            log.log(1, {"loss": "low"})
    with pytest.raises(RuntimeError, match="closed"):
        log.log(2, {"loss": 1.0})


def test_tensorboard_events_are_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as log:
        for step in range(3):
            log.log(step, {"loss": 1.0 / (step + 1)})
        log.log(2, {"acc": 0.75}, split="val")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "val/acc"}
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    assert acc.Scalars("val/acc")[0].value == pytest.approx(0.75)


def test_other_ranks_write_nothing(tmp_path):
    out = tmp_path / "run"
    with MetricsLogger(out, rank=1) as log:
        log.log(1, {"loss": 1.0})
        assert not log.enabled
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# StepTimer
# ----------------------------------------------------------------------------------------------------------------


def test_step_timer_splits_data_and_step_time():
    clock = iter([0.0, 0.1, 0.3, 0.5, 0.6, 1.0, 1.1])  # a fake clock keeps the test deterministic
    timer = StepTimer(world_size=2, skip_first=1, clock=lambda: next(clock))
    timer.start()  # 0.0
    timer.data_done()  # 0.1
    timer.step_done(8)  # 0.3 -> skipped (warm-up)
    assert timer.summary() == {} and timer.last == pytest.approx({"data_time": 0.1, "step_time": 0.3})
    timer.data_done()  # 0.5: data 0.2
    timer.step_done(8, tokens=80)  # 0.6: step 0.3
    timer.data_done()  # 1.0: data 0.4
    timer.step_done(8, tokens=80)  # 1.1: step 0.5
    s = timer.summary()
    assert s["data_time"] == pytest.approx(0.3) and s["step_time"] == pytest.approx(0.4)
    assert s["data_frac"] == pytest.approx(0.75)
    assert s["samples_per_s_per_gpu"] == pytest.approx(16 / 0.8) and s["samples_per_s"] == pytest.approx(40.0)
    assert s["tokens_per_s"] == pytest.approx(400.0)
    assert "peak_mem_gib" not in s
    timer.reset()
    assert timer.summary() == {}


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: would check that StepTimer synchronises the device before reading the clock and reports "
    "peak_mem_gib (the CPU timing arithmetic is checked above)",
)
def test_step_timer_on_cuda_synchronises_and_reports_memory():
    timer = StepTimer("cuda")
    x = torch.randn(512, 512, device="cuda")
    for _ in range(2):
        timer.data_done()
        for _ in range(20):
            x = (x @ x).tanh()
        timer.step_done(4)
    s = timer.summary()
    assert s["step_time"] > 0 and s["samples_per_s"] > 0 and s["peak_mem_gib"] > 0


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _synthetic_run(run_dir, steps: int = 120):
    """train loss 1/(s+1) with lr/samples/s/data_time every step; val every 10 steps with acc peaking at step 30."""
    val_acc = {10: 0.4, 20: 0.6, 30: 0.8, 40: 0.7, 50: 0.75}
    with MetricsLogger(run_dir, tensorboard=False) as log:
        for s in range(1, steps + 1):
            log.log(
                s,
                {"loss": 1.0 / (s + 1), "lr": 1e-3 * s / steps, "samples_per_s": 100.0 + s, "data_time": 0.01},
            )
            if s in val_acc:
                log.log(s, {"loss": 2.0 - val_acc[s], "acc": val_acc[s]}, split="val")
    return val_acc


def test_report_values_files_and_pngs(tmp_path):
    val_acc = _synthetic_run(tmp_path)
    summary = {"arm": "baseline", "config": {"lr": 1e-3, "blocks": [4, 5]}, "params": {"trainable": 1234}}
    out = write_report(tmp_path, summary=summary, title="Tiny run")
    assert out == tmp_path / "report"

    report = json.loads((out / "report.json").read_text())
    assert report["summary"] == {
        "arm": "baseline",
        "config": {"lr": 1e-3, "blocks": [4, 5]},
        "params": {"trainable": 1234},
    }
    assert report["final"]["train"]["loss"] == pytest.approx(1 / 121)
    assert report["best"]["train"]["loss"] == pytest.approx(1 / 121)
    assert report["metrics"]["train"]["loss"]["final_step"] == 120
    assert report["final"]["val"]["acc"] == pytest.approx(0.75)
    assert report["best"]["val"]["acc"] == pytest.approx(0.8)
    assert report["metrics"]["val"]["acc"]["best_step"] == 30
    assert report["best"]["val"]["loss"] == pytest.approx(1.2) and report["metrics"]["val"]["loss"]["best_step"] == 30
    assert "lr" not in report["best"]["train"]  # no "best" learning rate ...
    assert report["metrics"]["train"]["lr"]["max"] == pytest.approx(1e-3)  # ... but its range
    assert report["metrics"]["val"]["acc"]["count"] == len(val_acc)

    assert sorted(report["plots"]) == ["accuracy.png", "loss.png", "lr.png", "throughput.png", "timing.png"]
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000  # a real drawing, not an empty canvas
        assert b"IEND" in data[-12:]

    md = (out / "report.md").read_text()
    assert md.startswith("# Tiny run")
    assert "| split | metric | final | at step | best | at step | goal | min | max |" in md
    assert "| val | acc | 0.75 | 50 | 0.8 | 30 | max |" in md
    assert "| arm | baseline |" in md and "| config.lr | 0.001 |" in md
    for name in report["plots"]:
        assert f"({name})" in md


def test_report_only_plots_existing_metrics_and_handles_nan(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 1.0})
        log.log(2, {"loss": float("nan")})
        log.log(3, {"loss": 0.5})
        log.log(4, {"loss": float("nan")})
    out = write_report(tmp_path, summary={"score": float("inf")})
    report = json.loads((out / "report.json").read_text())  # strict JSON despite NaN/inf
    assert report["plots"] == ["loss.png"] and not (out / "lr.png").exists()
    assert report["final"]["train"]["loss"] is None  # the last value was NaN
    assert report["best"]["train"]["loss"] == 0.5
    assert report["summary"]["score"] is None


def test_report_without_metrics_and_missing_file(tmp_path):
    out = write_report(tmp_path, summary={"arm": "x"})
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == {} and report["plots"] == [] and (out / "report.md").is_file()
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        write_report(tmp_path, summary={}, metrics_path=tmp_path / "nope.jsonl")


def test_resumed_run_replaces_rolled_back_steps():
    records = [
        {"step": 1, "split": "train", "loss": 3.0},
        {"step": 2, "split": "train", "loss": 2.0},
        {"step": 3, "split": "train", "loss": 9.0},  # logged, then the run crashed; resumed from step 2
        {"step": 2, "split": "train", "loss": 2.1},
        {"step": 2, "split": "train", "grad_norm": 1.0},  # a second record at the same step is merged
        {"step": 3, "split": "train", "loss": 1.5},
    ]
    series = metric_series(records)
    assert series[("train", "loss")] == [(1, 3.0), (2, 2.1), (3, 1.5)]
    assert series[("train", "grad_norm")] == [(2, 1.0)]
    summary = summarize_metrics(records)
    assert summary["train"]["loss"]["best"] == 1.5 and summary["train"]["loss"]["max"] == 3.0


def test_metric_modes():
    assert metric_mode("loss") == metric_mode("val_loss") == metric_mode("perplexity") == "min"
    assert metric_mode("acc") == metric_mode("top1") == metric_mode("recall@5") == metric_mode("mAP") == "max"
    assert metric_mode("lr") is None and metric_mode("samples_per_s") is None and metric_mode("grad_norm") is None


def test_compare_runs_table():
    rows = [
        {"arm": "baseline", "best": {"val": {"acc": 0.61}}, "params": 1000},
        {"arm": "+frozen block", "best": {"val": {"acc": 0.6512}}, "params": 1000},
        {"arm": "+random block", "best": {"val": {"acc": None}}},
    ]
    table = compare_runs_table(
        rows, ["arm", ("best.val.acc", "val acc"), ("params", "trainable")], best={"best.val.acc": "max"}
    )
    assert table.splitlines() == [
        "| arm | val acc | trainable |",
        "|---|---:|---:|",
        "| baseline | 0.61 | 1000 |",
        "| +frozen block | **0.6512** | 1000 |",
        "| +random block | - | - |",
    ]
    assert "a\\|b" in compare_runs_table([{"x": "a|b"}], ["x"])
    with pytest.raises(ValueError, match="min"):
        compare_runs_table(rows, ["arm"], best={"arm": "up"})
