"""The GPU benchmark scripts run (a CPU smoke run): a script that only ever runs on a lent GPU must not be found
broken there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_encoder_step_smoke_on_cpu():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_encoder_step.py"), "--device", "cpu", "--small", "--steps", "1"]
        + ["--compile", "off", "--arms", "baseline,frozen,trainable"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["arm"] for r in rows] == ["baseline", "frozen", "trainable"]
    base, frozen, trainable = rows
    assert frozen["frozen_M"] > 3 and trainable["trainable_M"] > base["trainable_M"] + 3  # the 576-wide block
    assert frozen["tflops_per_step"] > base["tflops_per_step"] > 0
    assert "| frozen | off |" in out.stdout
