"""Builders: every tokenizer/backbone combination a config can name, initialising stages from a checkpoint, freezing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmblocks.builders import build_encoder, freeze_stages, load_encoder_weights
from mmblocks.config import ConfigError
from mmblocks.train import trainable_state_dict

TINY_VIT = {
    "name": "vit_tiny_patch16_224",
    "img_size": 16,
    "patch_size": 4,
    "depth": 2,
    "embed_dim": 32,
    "num_heads": 2,
}


def _cfg(**model):
    return {"model": {"backbone": dict(TINY_VIT), "num_classes": 3, **model}}


@pytest.mark.parametrize(
    ("tokenizer", "inputs"),
    [
        ({"name": None}, torch.randn(2, 3, 16, 16)),
        (
            {"name": "audio_patches", "kwargs": {"target_frames": 32, "fstride": 16, "tstride": 16}},
            torch.randn(2, 4000),
        ),
        ({"name": "audio_frames", "kwargs": {"stack": 4}}, torch.randn(2, 4000)),
        ({"name": "video_tubelets", "kwargs": {"img_size": 32, "num_frames": 4}}, torch.randn(2, 4, 3, 32, 32)),
        ({"name": "motion", "kwargs": {"img_size": 32, "num_frames": 4, "patch_size": 1}}, torch.rand(2, 4, 3, 32, 32)),
    ],
)
def test_vit_blocks_serve_every_tokenizer(tokenizer, inputs):
    torch.manual_seed(0)
    encoder = build_encoder(_cfg(tokenizer=tokenizer, head={"pool": "mean"}), verbose=False)
    assert encoder(inputs).shape == (2, 3)
    if tokenizer["name"] is not None:  # the ViT's unused patch embedding is dropped
        assert not any("patch_embed" in n for n, _ in encoder.named_parameters())


def test_point_transformer_backbone_and_bad_tokenizer():
    cfg = {"model": {"backbone": {"type": "point_transformer", "embed_dim": 32, "depth": 1, "num_heads": 2},
                     "tokenizer": {"kwargs": {"num_groups": 8, "group_size": 4}}, "num_classes": 2}}  # fmt: skip
    encoder = build_encoder(cfg, verbose=False)
    assert encoder(torch.randn(2, 64, 3)).shape == (2, 2)
    assert "backbone other" in encoder.parameter_table()  # the per-block position MLP is counted
    cfg["model"]["tokenizer"]["name"] = "audio_patches"
    with pytest.raises(ConfigError, match="point_transformer needs 'points'"):
        build_encoder(cfg, verbose=False)
    with pytest.raises(ConfigError, match=r"model\.tokenizer\.kwargs for 'audio_frames'"):
        build_encoder(_cfg(tokenizer={"name": "audio_frames", "kwargs": {"stacks": 4}}), verbose=False)


def test_init_from_checkpoint_and_freeze(tmp_path):
    torch.manual_seed(0)
    trained = build_encoder(_cfg(), verbose=False)
    save_file({k: v.contiguous() for k, v in trainable_state_dict(trained).items()}, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    cfg = _cfg(init={"checkpoint": str(tmp_path)}, freeze=["tokenizer", "backbone"], head={"pool": "mean"})
    cfg["model"]["backbone"]["drop_path_rate"] = 0.5
    encoder = build_encoder(cfg, verbose=False)
    for name, p in encoder.named_parameters():
        if name.startswith(("tokenizer.", "backbone.")):
            torch.testing.assert_close(p, dict(trained.named_parameters())[name])
            assert not p.requires_grad
        else:  # the head is new and trainable
            assert p.requires_grad and name.startswith("head.")
    assert not torch.equal(encoder.head.fc.weight, trained.head.fc.weight)
    encoder.train()
    assert encoder.training and not encoder.backbone.training and encoder.head.training
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(encoder.forward_features(x).x, encoder.forward_features(x).x)  # no drop-path
    with pytest.raises(ValueError, match="shape"):
        load_encoder_weights(build_encoder(_cfg(backbone={**TINY_VIT, "embed_dim": 64}), verbose=False), tmp_path)
    only_tokenizer = {k: v.contiguous() for k, v in trainable_state_dict(trained).items() if k.startswith("tokenizer.")}
    save_file(only_tokenizer, tmp_path / "tokenizer.safetensors")
    with pytest.raises(ValueError, match="no weights for stage 'backbone'"):
        load_encoder_weights(encoder, tmp_path / "tokenizer.safetensors", stages=["backbone"])
    with pytest.raises(ConfigError, match="unknown encoder stage"):
        freeze_stages(encoder, ["blocks"])


def test_llm_stage_soft_attention_and_2d_rope_from_a_config():
    from mmblocks.models import advance_soft_masks

    llm = {
        "enabled": True,
        "source": "random:llama",
        "config_overrides": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "num_hidden_layers": 2},
        "layers": [-1],
        "attention": "soft",
        "soft_mask": {"mode": "linear", "cutoff": 2, "unit": "steps"},
        "rope": "2d",
    }  # fmt: skip
    encoder = build_encoder(_cfg(llm=llm), verbose=False)
    assert advance_soft_masks(encoder, 1) == {"llm_stage.blocks": 0.5}
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, 3)
