"""The house's promise, checked: a new component is one definition plus one registration, and the config, the
builders, the recipes and the trainer take it with no other change (here: a head defined in this test file)."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

from mmblocks.config import ConfigError, load_config
from mmblocks.heads import register_head
from mmblocks.recipes import build_trainer
from tokenizers_mm import Tokens


@register_head("test_mlp_head")  # the one registration
class MLPHead(nn.Module):
    """Mean-pooled tokens -> a hidden layer -> class logits."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 32, act: Literal["gelu", "relu"] = "gelu"):
        super().__init__()
        self.act = act
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU() if act == "gelu" else nn.ReLU(),
                                 nn.Linear(hidden, num_classes))  # fmt: skip

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return self.net(tokens.x.mean(1))


def test_a_registered_head_is_validated_built_and_trained_from_a_config(digit_shards, tmp_path):
    overrides = [
        f"data.root={digit_shards}",
        f"train.out_dir={tmp_path}",
        "data.channels=1",
        "data.image_size=16",
        "data.num_workers=0",
        "model.backbone.img_size=16",
        "model.backbone.patch_size=4",
        "model.backbone.depth=1",
        "model.head={name: test_mlp_head, hidden: 24, act: relu}",
        "train.max_steps=2",
        "train.epochs=1",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    trainer = build_trainer("configs/image/digits_vit_tiny.yaml", overrides)
    head = trainer.model.head
    assert isinstance(head, MLPHead) and head.act == "relu" and head.net[0].out_features == 24
    assert head.net[2].out_features == 10, "the task gives the class count"
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["test"]["samples"] == 270
    with pytest.raises(ConfigError, match=r"model\.head\.hiden: unknown key.*did you mean 'hidden'"):
        load_config({"model": {"head": {"name": "test_mlp_head", "hiden": 3}}})
    with pytest.raises(ConfigError, match=r"model\.head\.act: 'tanh' is not one of \['gelu', 'relu'\]"):
        load_config({"model": {"head": {"name": "test_mlp_head", "act": "tanh"}}})
