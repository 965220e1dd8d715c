"""Every ASR / VLM / video-LLM recipe trains a few steps end to end, as written, on small versions of its dataset
(the real SmolLM2-135M as the LM), and evaluates by generating; LLaVA's stage 2 starts exactly where stage 1 ended."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_helpers import short_run

from mmblocks.config import load_config
from mmblocks.recipes import build_trainer

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    str(p.relative_to(REPO)) for d in ("asr", "vlm", "video_llm") for p in (REPO / "configs" / d).glob("*.yaml")
)

pytestmark = pytest.mark.slow


def _overrides(root: Path, out: Path) -> list[str]:
    return [*short_run(root, out, batch_size=2), "data.val_split=null"]


def test_every_generation_recipe_has_a_frozen_smollm2_and_a_lora_arm():
    heads = {}
    for recipe in RECIPES:
        cfg = load_config(REPO / recipe)
        if cfg["task"]["name"] == "prefix_lm":
            assert cfg["model"]["head"]["lm"] == "smollm2-135m"
            heads.setdefault(Path(recipe).parent.name, set()).add(cfg["model"]["head"]["tune"])
    assert heads == {d: {"frozen", "lora"} for d in ("asr", "vlm", "video_llm")}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_and_generates(recipe, small_datasets, tmp_path):
    cfg = load_config(REPO / recipe)
    root = small_datasets(cfg["data"]["dataset"])
    summary = build_trainer(REPO / recipe, _overrides(root, tmp_path / "run")).fit()
    assert summary["steps"] == 2
    test = summary["test"]
    assert test["samples"] >= 2 and all(v == v for v in test.values())  # no NaN
    if cfg["task"]["name"] == "prefix_lm":
        lines = (tmp_path / "run" / "report" / "predictions_test.jsonl").read_text().splitlines()
        assert len(lines) == test["samples"]
        for metric in cfg["task"]["metrics"]:
            key = {"bleu": "bleu4", "motion": "motion_acc"}.get(metric, metric)
            assert key in test


def test_llava_stage2_starts_from_stage1(small_datasets, tmp_path):
    root = small_datasets("shapes")
    stage1 = build_trainer(REPO / "configs/vlm/shapes_smollm2.yaml", _overrides(root, tmp_path / "s1"))
    stage1.fit()
    stage2 = build_trainer(
        REPO / "configs/vlm/shapes_smollm2_stage2.yaml",
        [*_overrides(root, tmp_path / "s2"), f"model.init.checkpoint={tmp_path / 's1'}"],
    )
    task = stage2.task
    batch = next(iter(stage2.train_loader))
    torch.manual_seed(0)
    _, prompts, answers, _ = task.examples_of(batch, train=True)
    text = task._text(prompts, answers, torch.device("cpu"))
    losses = []
    for model in (stage1.model, stage2.model):
        model.eval()
        with torch.no_grad():
            losses.append(model(batch.inputs, head_inputs=text).loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6, rtol=0)
    lora = [n for n, p in stage2.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all("lora_" not in n for n, _ in stage1.model.named_parameters())
