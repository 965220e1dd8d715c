"""`train.instrument_every`: per-stage activation RMS, across-sample spread, the LLM blocks' update RMS and gradient
norms per stage, logged without changing the training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import short_run

from mmblocks.recipes import build_trainer, train
from mmblocks.train import read_metrics, token_stats

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "image" / "digits_vit_tiny_smollm2.yaml"
TINY = ["data.image_size=16", "model.backbone.img_size=16", "model.backbone.patch_size=4", "model.backbone.depth=1"]


def test_token_stats_against_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, generator=g) + 0.5
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, 3:] = False
    rms, spread = token_stats(x, mask)
    xs = x.numpy()
    real = np.concatenate([xs[b][mask[b].numpy()] for b in range(4)])
    assert rms == pytest.approx(float(np.sqrt((real**2).mean())), rel=1e-5)
    pooled = np.stack([xs[b][mask[b].numpy()].mean(0) for b in range(4)])
    assert spread == pytest.approx(float(pooled.std(0, ddof=1).mean() / np.abs(pooled).mean()), rel=1e-5)
    same = x[:1].expand(4, -1, -1)
    assert token_stats(same)[1] == pytest.approx(0.0, abs=1e-6)  # collapsed: every sample pools the same


def _stages(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "stages"]


@pytest.mark.parametrize("tune", ["frozen", "random"])
def test_instrumented_run_logs_every_stage_and_trains_the_same(tune, tmp_path, small_datasets):
    root = small_datasets("digits")
    common = [*TINY, f"model.llm.tune={tune}"]
    plain = train(RECIPE, [*common, *short_run(root, tmp_path / "plain", steps=3, batch_size=8)])
    inst = train(
        RECIPE, [*common, *short_run(root, tmp_path / "inst", steps=3, batch_size=8), "train.instrument_every=2"]
    )
    assert inst["test"]["loss"] == pytest.approx(plain["test"]["loss"], rel=1e-6)  # hooks change nothing
    records = _stages(tmp_path / "inst")
    assert [r["step"] for r in records] == [2]
    rec = records[0]
    for label in ("tokens", "into_llm", "adapter_in", "adapter_out", "into_head"):
        assert rec[f"rms.{label}"] > 0 and rec[f"spread.{label}"] >= 0, label
    for group in ("tokenizer", "backbone", "llm_stage.adapter_in", "llm_stage.adapter_out", "head"):
        assert rec[f"grad.{group}"] > 0, group
    assert "grad.llm_stage.blocks" not in rec  # frozen: no gradient
    assert rec["update.llm"] > 0
    # the adapter's output at init is small (RMS ~0.1 here); the family's 0.02 init moves it by about its own size,
    # the pretrained block by tens of times its size (measured: 1.25 vs 88): the input is swamped
    assert rec["rms.adapter_in"] < 0.5
    if tune == "random":
        assert rec["update.llm"] < 5
    else:
        assert rec["update.llm"] > 20


def test_baseline_logs_the_stages_it_has(tmp_path, small_datasets):
    root = small_datasets("digits")
    train(RECIPE, [*TINY, "model.llm.enabled=false", *short_run(root, tmp_path, steps=2), "train.instrument_every=1"])
    rec = _stages(tmp_path)[-1]
    assert "rms.tokens" in rec and "rms.into_head" in rec and "grad.backbone" in rec
    assert not any("llm" in k or "adapter" in k for k in rec)


def test_lr_scale_gives_each_stage_its_learning_rate(tmp_path, small_datasets):
    root = small_datasets("digits")
    scale = "train.lr_scale={llm_stage: 0.5, llm_stage.adapter_in: 0.1}"
    trainer = build_trainer(RECIPE, [*TINY, *short_run(root, tmp_path), "train.lr=0.002", scale])
    peak = {name: g["initial_lr"] for g in trainer.optimizer.param_groups for name in g["param_names"]}
    for name, lr in peak.items():  # the longest prefix wins
        want = 0.0002 if name.startswith("llm_stage.adapter_in.") else 0.001 if name.startswith("llm_stage.") else 0.002
        assert lr == pytest.approx(want), name
    assert any(n.startswith("llm_stage.adapter_out.") for n in peak) and any(n.startswith("head.") for n in peak)
    with pytest.raises(ValueError, match="match no trainable parameter"):
        build_trainer(RECIPE, [*TINY, *short_run(root, tmp_path / "x"), "train.lr_scale={llm_stage.blocks: 2}"])
    # a model without that part (the baseline arm of a study that sets lr_scale for all arms) trains as usual
    base = build_trainer(
        RECIPE, [*TINY, *short_run(root, tmp_path / "b"), "model.llm.enabled=false", "train.lr_scale={llm_stage: 0.5}"]
    )
    assert {g["initial_lr"] for g in base.optimizer.param_groups} == {0.001}
