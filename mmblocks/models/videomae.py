"""VideoMAE (Tong et al. 2022) encoder: `video_tubelets` tokens + timm's own ViT blocks.

VideoMAE is a plain ViT over ``2 x 16 x 16`` tubelets (Conv3d), with VideoMAE's fixed 1-D sinusoid positions over
the flat token index, no cls token, pre-norm blocks whose attention has q and v biases but none on k, and either a
final LayerNorm (``use_mean_pooling=False``) or none (``use_mean_pooling=True``, HF's default: the task model then
mean-pools and applies its ``fc_norm``). Here it is the `VideoTubelets` tokenizer plus a `TimmViT` without patch
embedding (`timm_vit_blocks`); HF's missing k bias becomes a zero slice of timm's fused qkv bias (exact: a constant
added to every key shifts all scores of a query equally, softmax ignores it, and its gradient is zero).

- `videomae_from_hf(model)` converts a Hugging Face ``VideoMAEModel`` / ``VideoMAEForVideoClassification`` /
  ``VideoMAEForPreTraining`` (or a state dict and its ``VideoMAEConfig``) into ``(VideoTubelets, TimmViT)``;
  ``MMEncoder(tok, backbone).forward_features(frames)`` then equals ``VideoMAEModel(frames).last_hidden_state``
  (with or without the final LayerNorm, as the config says).
- `build_videomae(...)` (the ``videomae`` backbone; ``videomae_small`` ... ``videomae_huge`` by name) and
  `videomae_backbone(...)` build a from-scratch VideoMAE encoder of any size (`VIDEOMAE_PRESETS`).

Input: ``[B, T, C, H, W]`` float frames, already normalised (VideoMAE's image processor does that outside the model;
`tokenizers_mm.normalize_frames` does it for decoded uint8 frames). HF's VideoMAE has no padding mask; a frame mask
``[B, T]`` passed to `MMEncoder` hides padded tubelets from attention, which equals HF run on the real tubelets only
(``bool_masked_pos = ~tokens.mask``, sample by sample).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from tokenizers_mm import VideoTubelets

from .ast import timm_vit_blocks
from .backbones import TimmViT
from .hf_vit import (
    hf_activation,
    hf_tensor,
    hf_vit_layers,
    load_exact,
    load_hf_vit_layers,
    model_and_config,
    strip_prefix,
)
from .registry import preset_sizes, register_backbone

__all__ = [
    "VIDEOMAE_PRESETS",
    "VIDEOMAE_TUBELETS",
    "build_videomae",
    "videomae_backbone",
    "videomae_from_hf",
    "videomae_tokenizer",
]

#: VideoMAE's encoder sizes (ViT-S/B/L/H, tubelets 2 x 16 x 16).
VideoMAEPreset = Literal["videomae_small", "videomae_base", "videomae_large", "videomae_huge"]
VIDEOMAE_PRESETS: dict[str, dict[str, int]] = {
    "videomae_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "videomae_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "videomae_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "videomae_huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}


def _single(value: Any, what: str) -> int:
    """An int from an int or a square pair."""
    if isinstance(value, int):
        return value
    value = tuple(int(v) for v in value)
    if len(set(value)) != 1:
        raise ValueError(f"only square {what} are supported, got {value}")
    return value[0]


#: VideoMAE's input layout: 16 frames of 224 x 224, 2 x 16 x 16 tubelets, fixed sin-cos positions, no cls token
#: (`VideoTubelets` arguments).
VIDEOMAE_TUBELETS: dict[str, Any] = {
    "img_size": 224,
    "num_frames": 16,
    "patch_size": 16,
    "tubelet_size": 2,
    "in_chans": 3,
    "pos_embed": "sincos",
    "class_token": False,
}


def videomae_tokenizer(embed_dim: int, **options: Any) -> VideoTubelets:
    """`VideoTubelets` of width `embed_dim` in VideoMAE's layout (`VIDEOMAE_TUBELETS`), `options` overriding."""
    return VideoTubelets(**{**VIDEOMAE_TUBELETS, "embed_dim": embed_dim, **options})


@register_backbone("videomae", tokenizer="video_tubelets")
def build_videomae(
    preset: VideoMAEPreset | None = None,
    *,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    final_norm: bool = True,
    drop_path_rate: float = 0.0,
    norm_eps: float = 1e-6,
) -> TimmViT:
    """VideoMAE's encoder from scratch (timm's ViT blocks and init): sizes from `preset` (a key of
    `VIDEOMAE_PRESETS`; default ``videomae_base``), each overridden by an explicit value. ``final_norm=True`` keeps
    a LayerNorm after the blocks (the center paper's place for the LLM stage is before it); False is VideoMAE's
    mean-pooling layout. A head reads out the mean of the tokens by default (``readout = "mean"``). Its own
    tokenizer (``make_tokenizer(**options)``) is `VideoTubelets` in VideoMAE's layout (`VIDEOMAE_TUBELETS`;
    ``pos_embed``: ``sincos``, ``learned`` or ``none``), the options overriding."""
    embed_dim, depth, num_heads = preset_sizes(
        VIDEOMAE_PRESETS, preset, "videomae_base", "VideoMAE", embed_dim=embed_dim, depth=depth, num_heads=num_heads
    )
    return timm_vit_blocks(
        embed_dim,
        depth,
        num_heads,
        mlp_hidden_dim=int(embed_dim * mlp_ratio),
        qkv_bias=qkv_bias,
        norm_eps=norm_eps,
        drop_path_rate=drop_path_rate,
        final_norm=final_norm,
        name=preset or "videomae",
        tokenizer_factory=functools.partial(videomae_tokenizer, embed_dim),
        readout="mean",  # VideoMAE reads out the mean of its tokens (no cls token)
    )


def videomae_backbone(
    preset: VideoMAEPreset | None = None,
    *,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    final_norm: bool = True,
    drop_path_rate: float = 0.0,
    norm_eps: float = 1e-6,
    **tokenizer_kwargs: Any,
) -> tuple[VideoTubelets, TimmViT]:
    """A from-scratch VideoMAE encoder: ``(VideoTubelets, TimmViT)``, randomly initialised (timm's ViT init); the
    ``videomae`` backbone (`build_videomae`) and its own tokenizer (`videomae_tokenizer`, built first),
    `tokenizer_kwargs` overriding VideoMAE's layout (`VIDEOMAE_TUBELETS`: ``img_size``, ``num_frames``,
    ``patch_size``, ``tubelet_size``, ``in_chans``, ``pos_embed``, ``class_token``).
    """
    embed_dim, depth, num_heads = preset_sizes(
        VIDEOMAE_PRESETS, preset, "videomae_base", "VideoMAE", embed_dim=embed_dim, depth=depth, num_heads=num_heads
    )
    tokenizer = videomae_tokenizer(embed_dim, **tokenizer_kwargs)
    backbone = build_videomae(
        preset,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        final_norm=final_norm,
        drop_path_rate=drop_path_rate,
        norm_eps=norm_eps,
    )
    return tokenizer, backbone


for _preset in VIDEOMAE_PRESETS:  # videomae_small, ..., videomae_huge
    register_backbone(_preset, functools.partial(build_videomae, _preset), tokenizer="video_tubelets")


def videomae_from_hf(model: Any, config: Any = None) -> tuple[VideoTubelets, TimmViT]:
    """Convert an HF VideoMAE encoder into ``(VideoTubelets, TimmViT)`` with the same weights (copied, fp32).

    Args:
        model: ``transformers.VideoMAEModel``, ``VideoMAEForVideoClassification`` or ``VideoMAEForPreTraining``
            (their heads / decoder are dropped), or a state dict of any of them (then `config` is needed). Both
            HF bias layouts (``q_bias`` / ``v_bias`` parameters and ``query.bias`` / ``value.bias``) load.
        config: the ``VideoMAEConfig`` (default: ``model.config``).

    The backbone's final norm is HF's ``layernorm`` when ``config.use_mean_pooling`` is False, else ``nn.Identity``
    (HF's ``last_hidden_state`` is then un-normed; a classification model's ``fc_norm`` acts after mean pooling and
    is not part of this pair). ``MMEncoder(*videomae_from_hf(model)).forward_features(frames)`` is
    ``[B, T'*H'*W', D]``, equal to ``model(frames).last_hidden_state``.
    """
    sd, config = model_and_config(model, config, "videomae")
    sd = strip_prefix(sd, ("videomae.",))
    d = config.hidden_size
    patch = _single(config.patch_size, "patches")
    tokenizer = VideoTubelets(
        img_size=config.image_size,
        num_frames=config.num_frames,
        patch_size=patch,
        tubelet_size=config.tubelet_size,
        in_chans=config.num_channels,
        embed_dim=d,
        pos_embed="sincos",
        class_token=False,
    )
    conv = {"weight": hf_tensor(sd, "embeddings.patch_embeddings.projection.weight", "VideoMAE")}
    if "embeddings.patch_embeddings.projection.bias" in sd:
        conv["bias"] = sd["embeddings.patch_embeddings.projection.bias"]
    load_exact(tokenizer.proj, conv, "VideoMAE tubelet embedding")
    mean_pooling = bool(getattr(config, "use_mean_pooling", True))
    backbone = timm_vit_blocks(
        d,
        config.num_hidden_layers,
        config.num_attention_heads,
        mlp_hidden_dim=config.intermediate_size,
        qkv_bias=bool(getattr(config, "qv_bias", True)),
        norm_eps=config.layer_norm_eps,
        act=hf_activation(config),
        final_norm=not mean_pooling,
        name="videomae_hf",
        readout="mean",
    )
    final = None if mean_pooling else {k: hf_tensor(sd, f"layernorm.{k}", "VideoMAE") for k in ("weight", "bias")}
    load_hf_vit_layers(backbone, hf_vit_layers(sd, config.num_hidden_layers), final)
    return tokenizer, backbone
