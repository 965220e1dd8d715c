"""Every points / audio / video recipe trains a few steps end to end from its offline dataset's shards.

The datasets are made small (same makers, fewer samples); the recipes run as written except for the data root, the
output folder, the step count and the batch size, so the wiring (tokenizer, backbone, LLM stage, head, loader codec,
masks, codec motion vectors) is exactly the recipe's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from data_helpers import short_run
from safetensors.torch import load_file

from mmblocks.config import load_config
from mmblocks.recipes import build_trainer
from mmblocks.train import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    str(p.relative_to(REPO)) for d in ("points", "audio", "video") for p in (REPO / "configs" / d).glob("*.yaml")
)


def test_recipes_exist_for_every_modality_with_three_arms():
    names = {Path(r).stem for r in RECIPES}
    for base in ("meshes_point_bert", "keywords_ast_tiny", "moving_digits_tubelets", "moving_digits_motion"):
        assert {base, f"{base}_smollm2", f"{base}_smollm2_random"} <= names
    for recipe in RECIPES:
        cfg = load_config(REPO / recipe)
        arm = Path(recipe).stem
        assert cfg["model"]["llm"]["enabled"] == arm.endswith(("_smollm2", "_smollm2_random"))
        if cfg["model"]["llm"]["enabled"]:
            assert cfg["model"]["llm"]["tune"] == ("random" if arm.endswith("_random") else "frozen")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_from_shards(recipe, small_datasets, tmp_path):
    cfg = load_config(REPO / recipe)
    root = small_datasets(cfg["data"]["dataset"])
    trainer = build_trainer(
        REPO / recipe,
        short_run(root, tmp_path / "run"),
    )
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert trainer.step == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train_rows)
    state = load_file(latest_checkpoint(tmp_path / "run" / "checkpoints") / "model.safetensors")
    if cfg["model"]["backbone"]["name"] == "point_transformer":  # BatchNorm statistics are trained state too
        assert "tokenizer.encoder.first.1.running_var" in state
    if cfg["model"]["llm"]["enabled"]:  # frozen LLM weights are rebuilt from their source, never saved
        assert cfg["model"]["llm"]["tune"] in ("frozen", "random")
        assert not [k for k in state if k.startswith("llm_stage.blocks")]
        assert any(k.startswith("llm_stage.adapter_in") for k in state)
    index = json.loads((root / "index.json").read_text())
    assert summary["test"]["samples"] == index["splits"]["test"]["num_samples"]  # every test clip/cloud counted once
