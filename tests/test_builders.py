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


# ------------------------------------------------------------------------------------------------ registries, presets
BACKBONE_CASES = [
    ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}, None,
     torch.randn(2, 3, 16, 16)),
    ("causal_vit_tiny", {"img_size": 16, "patch_size": 4, "depth": 1}, None, torch.randn(2, 3, 16, 16)),
    ("point_transformer", {"embed_dim": 32, "depth": 1, "num_heads": 2}, {"num_groups": 8, "group_size": 4},
     torch.randn(2, 64, 3)),
    ("ast_tiny", {"depth": 1}, {"target_frames": 64, "fstride": 16, "tstride": 16}, torch.randn(2, 8000)),
    ("videomae_small", {"depth": 1}, {"img_size": 32, "num_frames": 4}, torch.randn(2, 4, 3, 32, 32)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "options", "tokenizer", "inputs"), BACKBONE_CASES, ids=[c[0] for c in BACKBONE_CASES])
def test_every_backbone_from_a_config_with_its_own_tokenizer(name, options, tokenizer, inputs):
    from mmblocks.models import Backbone

    torch.manual_seed(0)
    cfg = {"model": {"backbone": {"name": name, **options}, "tokenizer": {"kwargs": tokenizer or {}}, "num_classes": 3}}
    encoder = build_encoder(cfg, verbose=False)
    assert isinstance(encoder.backbone, Backbone) and encoder.backbone.depth == 1
    assert encoder(inputs).shape == (2, 3)


def test_backbone_registry_and_protocol_errors():
    from torch import nn

    from mmblocks.models import MMEncoder, create_backbone, list_backbones

    names = set(list_backbones())
    assert {"vit", "causal_vit", "point_transformer", "ast", "videomae"} <= names
    assert {"ast_tiny", "ast_small", "ast_base", "videomae_small", "videomae_huge", "causal_vit_large"} <= names
    small = create_backbone("causal_vit_small", depth=1, img_size=32)
    assert (small.embed_dim, small.num_heads, small.depth) == (384, 6, 1)
    with pytest.raises(TypeError, match=r"Linear is not a Backbone: it lacks \['embed_dim', 'blocks'"):
        MMEncoder(nn.Identity(), nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"backbone causal_vit needs 'image_patches'.*got 'audio_frames'"):
        build_encoder(_cfg(backbone={"name": "causal_vit", "depth": 1}, tokenizer={"name": "audio_frames"}))
    with pytest.raises(
        ConfigError, match=r"model\.tokenizer\.kwargs for 'image_patches'.*set its size on the backbone"
    ):
        build_encoder(_cfg(tokenizer={"kwargs": {"patch_size": 8}}), verbose=False)


def test_named_encoders(tiny_checkpoint):
    from mmblocks import ast_llm, point_bert_llm, videomae_llm, vit_tiny_llm_last

    torch.manual_seed(0)
    llm = str(tiny_checkpoint("llama"))
    tiny_points = {"name": "point_transformer", "embed_dim": 32, "depth": 1, "num_heads": 2}
    points = point_bert_llm(4, num_groups=8, group_size=4, source=llm, backbone=tiny_points)
    assert points.head.pool == "cls+max" and points.llm_stage.blocks.trainable_parameters() == []
    assert points(torch.randn(2, 64, 3)).shape == (2, 4)
    audio = ast_llm(4, preset="ast_tiny", target_frames=64, source=llm, tune="lora")
    assert audio.backbone.depth == 12 and audio.tokenizer.num_prefix_tokens == 2
    assert audio.llm_stage.blocks.tune == "lora" and audio(torch.randn(2, 8000)).shape == (2, 4)
    video = videomae_llm(4, preset="videomae_small", img_size=32, num_frames=4, source=llm, llm=False)
    assert video.llm_stage is None and video.head.pool == "mean" and video.backbone.embed_dim == 384
    assert video(torch.randn(2, 4, 3, 32, 32)).shape == (2, 4)
    image = vit_tiny_llm_last(4, img_size=32, patch_size=8, source=llm)
    assert image.llm_stage.blocks.layer_indices == [3] and image(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_a_vit_without_class_token_reads_out_the_mean():
    encoder = build_encoder(_cfg(backbone={**TINY_VIT, "class_token": False}), verbose=False)
    assert encoder.backbone.readout == "mean" and encoder.head.pool == "mean"
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, 3)
