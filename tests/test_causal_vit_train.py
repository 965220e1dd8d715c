"""The causal-ViT configs train end to end; the trainer advances the soft mask and the ratio resumes with the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmblocks.data import make_dataset
from mmblocks.recipes import build_trainer, evaluate_checkpoint
from mmblocks.train import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.dataset=digits",
    "data.channels=1",
    "data.image_size=16",
    "model.backbone.img_size=16",
    "model.backbone.patch_size=4",
    "model.backbone.depth=1",
    "data.batch_size=32",
    "data.num_workers=0",
    "train.epochs=1",
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_dataset("digits", root, seed=0, progress=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("config", ["textures_causal_vit_tiny.yaml", "textures_causal_vit_tiny_bidirectional.yaml"])
def test_causal_vit_config_trains_and_advances_the_soft_mask(config, digits, tmp_path):
    soft = config == "textures_causal_vit_tiny.yaml"
    overrides = [*TINY, f"data.root={digits}", f"train.out_dir={tmp_path}"]
    if soft:  # r from 1 to 0 over 3 steps
        overrides.append("model.backbone.soft_mask={mode: linear, cutoff: 3, unit: steps}")
    trainer = build_trainer(REPO / "configs" / "image" / config, overrides)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["steps"] == 4 and summary["test"]["samples"] == 270
    # the reported figure is the checkpoint's: evaluated again from its weights alone, it is the same
    again = evaluate_checkpoint(REPO / "configs" / "image" / config, tmp_path / "checkpoints", overrides, ("test",))
    assert again["test"]["acc"] == pytest.approx(summary["test"]["acc"], abs=1e-9)
    assert again["test"]["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ratios = [r.get("soft_mask_r") for r in rows if r["split"] == "train"]
    if soft:
        assert ratios == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])  # set before each step's forward
        state = load_file(latest_checkpoint(tmp_path / "checkpoints") / "model.safetensors")
        assert any(k.endswith("soft_mask_ratio") for k in state)
    else:
        assert ratios == [None] * 4
