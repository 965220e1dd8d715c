"""The ``ctc`` task: its metrics on known paths, and end to end (config -> trainer -> WER / CER and predictions) on
a tiny espeak-ng ``sentences`` set."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from mmblocks.data import make_dataset
from mmblocks.eval import cer, wer
from mmblocks.recipes import build_trainer
from mmblocks.tasks import CTCMetrics, create_task


def test_metrics_are_corpus_wer_and_cer_of_greedy_transcriptions():
    task = create_task("ctc", alphabet="abc ")
    vocab = task.vocab
    # a path per sample: "ab c" and "cab" exactly, then a wrong one
    paths = {"ab c": [1, 0, 2, 4, 3], "cab": [3, 1, 1, 2, 0], "ba": [2, 2, 0, 1, 1]}
    refs = ["ab c", "cab", "ab"]
    log_probs = torch.full((3, 5, len(vocab)), -30.0)
    for b, path in enumerate(paths.values()):
        log_probs[b, torch.arange(5), torch.tensor(path)] = 0.0
    lengths = torch.tensor([5, 5, 5])

    class Batch:
        def __init__(self):
            self.key = ["a", "b", "c"]

        def field(self, name):
            return refs

    metrics = task.new_metrics(torch.device("cpu"))
    assert isinstance(metrics, CTCMetrics)
    metrics.update((log_probs, lengths), Batch())
    hyps = ["ab c", "cab", "ba"]
    out = metrics.compute()
    assert out["wer"] == pytest.approx(wer(refs, hyps)) and out["cer"] == pytest.approx(cer(refs, hyps))
    assert out["samples"] == 3 and [r["prediction"] for r in metrics.rows] == hyps


@pytest.mark.slow
def test_ctc_recipe_trains_and_reports(tmp_path, capsys):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng missing: apt-get install espeak-ng")
    data = tmp_path / "sentences"
    make_dataset("sentences", data, seed=0, clips=(48, 8, 8), progress=False)
    run = tmp_path / "run"
    overrides = [
        f"data.root={data}",
        f"train.out_dir={run}",
        "train.epochs=2",
        "data.batch_size=16",
        "data.num_workers=0",
        "model.backbone.embed_dim=64",
        "model.backbone.num_heads=4",
        "train.warmup_steps=2",
    ]
    summary = build_trainer("configs/asr/sentences_ctc.yaml", overrides).fit()
    assert summary["steps"] == 6 and summary["test"]["samples"] == 8
    assert summary["test"]["cer"] >= 0.0 and summary["test"]["wer"] >= 0.0
    rows = [json.loads(line) for line in (run / "report" / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"key", "reference", "prediction"} <= set(rows[0])
    assert "Transcriptions (test)" in (run / "report" / "report.md").read_text()
    # the CLI prints the task's own metrics
    from mmblocks.cli import main as cli_main

    assert cli_main(["train", "configs/asr/sentences_ctc.yaml", *overrides, "train.epochs=1", "--overwrite"]) == 0
    assert re.search(r"test loss [\d.]+, wer [\d.]+, cer [\d.]+ on 8 samples", capsys.readouterr().out)
