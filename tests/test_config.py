"""Configs: validation errors name the key path, the bad value and what is allowed; overrides; build from YAML."""

from __future__ import annotations

import pytest
import torch

from mmblocks import ConfigError, build_encoder, load_config


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"model": {"backbone": {"dept": 3}}}, r"model\.backbone\.dept: unknown key.*did you mean 'depth'"),
        ({"model": {"llm": {"tune": "freeze"}}}, r"model\.llm\.tune: 'freeze' is not one of .*'frozen'"),
        ({"train": {"lr": "fast"}}, r"train\.lr: expected int or float, got 'fast'"),
        ({"train": {"lr": -1}}, r"train\.lr: must be > 0"),
        ({"model": {"adapter_in": {"name": "qformerz"}}}, r"model\.adapter_in\.name: 'qformerz' is not one of"),
        ({"data": {"channels": 2}}, r"data\.channels: 2 is not one of \[1, 3\]"),
        ({"data": []}, r"data: expected a mapping"),
        ({"model": {"llm": {"layers": ["last"]}}}, r"model\.llm\.layers: expected a list of layer indices"),
        ({"trian": {}}, r"trian: unknown key.*did you mean 'train'"),
        ({"train": {"epochs": None}}, r"train\.epochs: null is not allowed"),
    ],
)
def test_validation_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        load_config(cfg)


def test_overrides_and_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  llm:\n    enabled: true\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.llm.layers=[0, -1]", "data.augment=false", "train.grad_clip=null"])
    assert cfg["name"] == "exp" and cfg["train"]["out_dir"] == "runs/exp"
    assert cfg["train"]["lr"] == 3e-4 and cfg["train"]["epochs"] == 3
    assert cfg["model"]["llm"]["layers"] == [0, -1] and cfg["data"]["augment"] is False
    assert cfg["train"]["grad_clip"] is None
    with pytest.raises(ConfigError, match=r"must look like key\.path=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_build_encoder_from_yaml(tmp_path, tiny_checkpoint):
    path = tmp_path / "enc.yaml"
    path.write_text(
        "model:\n"
        "  backbone: {name: vit_tiny_patch16_224, img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}\n"
        f"  llm: {{enabled: true, source: '{tiny_checkpoint('llama')}', layers: [-1]}}\n"
        "  num_classes: 7\n"
        "data: {channels: 1}\n"
    )
    enc = build_encoder(path)
    assert enc.llm_stage.blocks.layer_indices == [3] and enc.head.num_classes == 7
    assert enc.llm_stage.adapter_in.proj.bias is None, "the center paper's bias-free mappers by default"
    assert enc(torch.randn(2, 1, 32, 32)).shape == (2, 7)
