"""Audio Spectrogram Transformer (AST, Gong et al. 2021): `audio_patches` tokens + timm's own ViT blocks.

AST is DeiT over a log-mel spectrogram: overlapping 16x16 patches (stride 10 x 10), a cls and a distillation
token, learned absolute positions, pre-norm ViT blocks and a final LayerNorm. Here it is the `AudioPatches`
tokenizer (``class_token=True, dist_token=True``) plus a `TimmViT` without patch embedding (`timm_vit_blocks`:
timm's own ``Block`` instances, attention never rewritten, with HF's LayerNorm eps) whose final norm `MMEncoder`
applies after the LLM stage.

- `ast_from_hf(model)` converts a Hugging Face ``ASTModel`` / ``ASTForAudioClassification`` (or a state dict and
  its ``ASTConfig``) into ``(AudioPatches, TimmViT)``; ``MMEncoder(tok, backbone).forward_features(fbank)``
  then equals ``ASTModel(input_values).last_hidden_state``.
- `build_ast(...)` (the ``ast`` backbone; ``ast_tiny`` / ``ast_small`` / ``ast_base`` by name) and
  `ast_backbone(...)` build a from-scratch AST of any width / depth / heads (`AST_PRESETS` names the usual ones).

Normalisation: HF's ``ASTFeatureExtractor`` normalises the fbank *outside* the model,
``(fbank - mean) / (2 * std)`` with the AudioSet statistics, after zero-padding to ``max_length``. `AudioPatches`
does the same step inside the tokenizer (pad, then normalise, same default statistics). So:

- ``ast_from_hf(model)`` (``normalize=True``): feed the *raw* fbank ``[B, T, F]`` (or the waveform) to ours, and
  the feature extractor's ``input_values`` to HF;
- ``ast_from_hf(model, normalize=False)``: both take the same (already normalised) ``input_values``.

Padding: HF's AST has no padding mask (the feature extractor zero-pads to ``max_length`` and every token attends
to the padding). `AudioPatches` marks the patch columns past a clip's last real frame as padding (``Tokens.mask``)
and `MMEncoder` hides them from attention, so on clips shorter than ``max_length`` ours equals
``ASTModel(input_values, attention_mask=tokens.mask)``; feed the fbank already padded to ``max_length`` (all
tokens real) to get HF's unmasked output.

`timm_vit_blocks` (here) and the weight converters of `mmblocks.models.hf_vit` also serve `mmblocks.models.videomae`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from tokenizers_mm import AudioPatches

from ..layers.vit_blocks import vit_block_stack
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
    "AST_PRESETS",
    "AST_TOKENIZER",
    "ast_backbone",
    "ast_from_hf",
    "ast_tokenizer",
    "build_ast",
    "timm_vit_blocks",
]


def timm_vit_blocks(
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_hidden_dim: int | None = None,
    qkv_bias: bool = True,
    norm_eps: float = 1e-6,
    act: str = "gelu",
    drop_path_rate: float = 0.0,
    final_norm: bool = True,
    name: str = "vit_blocks",
    tokenizer_factory: Callable[..., nn.Module] | None = None,
    readout: str = "cls",
) -> TimmViT:
    """A `TimmViT` without patch embedding: timm's own ViT blocks and final norm (`mmblocks.layers.vit_block_stack`),
    sized here, so HF checkpoints (eps 1e-12, ``gelu``) load exactly. Another modality's tokenizer feeds the blocks.

    Args: those of `vit_block_stack`, plus ``name`` (what `TimmViT` reports), ``tokenizer_factory`` (the
    backbone's own tokenizer, built by `TimmViT.make_tokenizer`) and ``readout`` (the head pooling of its summary).
    """
    vit, sizes = vit_block_stack(
        embed_dim,
        depth,
        num_heads,
        mlp_hidden_dim=mlp_hidden_dim,
        qkv_bias=qkv_bias,
        norm_eps=norm_eps,
        act=act,
        drop_path_rate=drop_path_rate,
        final_norm=final_norm,
    )
    backbone = TimmViT(name, vit=vit, image_tokenizer=False, tokenizer_factory=tokenizer_factory, readout=readout)
    backbone.timm_config = {"name": name, **sizes}
    return backbone


# ---------------------------------------------------------------------------------------------------------- AST

#: DeiT sizes, as AST is DeiT over spectrograms (AST itself is ``ast_base``).
AstPreset = Literal["ast_tiny", "ast_small", "ast_base"]
AST_PRESETS: dict[str, dict[str, int]] = {
    "ast_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "ast_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "ast_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}


#: AST's input layout (Gong et al. 2021): 128 mel bins, 1024 frames (10.24 s), 16x16 patches with stride 10 x 10,
#: a cls and a distillation token (`AudioPatches` arguments).
AST_TOKENIZER: dict[str, Any] = {
    "num_mel_bins": 128,
    "target_frames": 1024,
    "patch_size": 16,
    "fstride": 10,
    "tstride": 10,
    "class_token": True,
    "dist_token": True,
}


def ast_tokenizer(embed_dim: int, **options: Any) -> AudioPatches:
    """`AudioPatches` of width `embed_dim` in AST's layout (`AST_TOKENIZER`), `options` overriding."""
    return AudioPatches(**{**AST_TOKENIZER, "embed_dim": embed_dim, **options})


@register_backbone("ast", tokenizer="audio_patches")
def build_ast(
    preset: AstPreset | None = None,
    *,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    norm_eps: float = 1e-6,
) -> TimmViT:
    """AST's transformer from scratch (timm's ViT blocks and init): sizes from `preset` (a key of `AST_PRESETS`;
    default ``ast_base``), each overridden by an explicit `embed_dim` / `depth` / `num_heads`. Its own tokenizer
    (``make_tokenizer(**options)``) is `AudioPatches` in AST's layout (`AST_TOKENIZER`), the options overriding."""
    embed_dim, depth, num_heads = preset_sizes(
        AST_PRESETS, preset, "ast_base", "AST", embed_dim=embed_dim, depth=depth, num_heads=num_heads
    )
    return timm_vit_blocks(
        embed_dim,
        depth,
        num_heads,
        mlp_hidden_dim=int(embed_dim * mlp_ratio),
        drop_path_rate=drop_path_rate,
        norm_eps=norm_eps,
        name=preset or "ast",
        tokenizer_factory=functools.partial(ast_tokenizer, embed_dim),
    )


def ast_backbone(
    preset: AstPreset | None = None,
    *,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    norm_eps: float = 1e-6,
    **tokenizer_kwargs: Any,
) -> tuple[AudioPatches, TimmViT]:
    """A from-scratch AST: ``(AudioPatches, TimmViT)``, randomly initialised (timm's ViT init); the ``ast`` backbone
    (`build_ast`) and its own tokenizer (`ast_tokenizer`, built first).

    `preset` (a key of `AST_PRESETS`) sets ``embed_dim / depth / num_heads`` unless given explicitly.
    `tokenizer_kwargs` override AST's layout (`AST_TOKENIZER`): ``target_frames=1024, fstride=tstride=10`` gives AST's
    ``12 x 101`` grid; 512 frames (ESC-50) gives ``12 x 50``; also ``normalize``, ``norm_mean``, ``norm_std``,
    ``sample_rate``, ``fbank_kwargs``, ... (`AudioPatches`).
    """
    embed_dim, depth, num_heads = preset_sizes(
        AST_PRESETS, preset, "ast_base", "AST", embed_dim=embed_dim, depth=depth, num_heads=num_heads
    )
    tokenizer = ast_tokenizer(embed_dim, **tokenizer_kwargs)
    backbone = build_ast(
        preset,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate,
        norm_eps=norm_eps,
    )
    return tokenizer, backbone


for _preset in AST_PRESETS:  # ast_tiny, ast_small, ast_base
    register_backbone(_preset, functools.partial(build_ast, _preset), tokenizer="audio_patches")


def ast_from_hf(
    model: Any,
    config: Any = None,
    *,
    normalize: bool = True,
    norm_mean: float = -4.2677393,
    norm_std: float = 4.5689974,
    **tokenizer_kwargs: Any,
) -> tuple[AudioPatches, TimmViT]:
    """Convert an HF AST into ``(AudioPatches, TimmViT)`` with the same weights (copied, in fp32).

    Args:
        model: ``transformers.ASTModel``, ``ASTForAudioClassification`` (its classifier is dropped), or a state
            dict of either (then `config` is needed). Both HF weight layouts (transformers 4 and 5) load.
        config: the ``ASTConfig`` (default: ``model.config``).
        normalize, norm_mean, norm_std: the tokenizer's fbank normalisation (see the module doc): True (default)
            does what ``ASTFeatureExtractor`` does, so ours takes the raw fbank; False takes HF's ``input_values``.
        tokenizer_kwargs: other `AudioPatches` arguments (``sample_rate``, ``fbank_kwargs``, ...).

    ``MMEncoder(*ast_from_hf(model)).forward_features(fbank)`` is ``[B, 2 + F' * T', D]``, equal to
    ``model(input_values).last_hidden_state`` (cls, distillation, then the patches row-major over
    ``(frequency, time)`` — the same order, since both lay the fbank out as ``[B, 1, F, T]``).
    """
    sd, config = model_and_config(model, config, "audio_spectrogram_transformer")
    sd = strip_prefix(sd, ("audio_spectrogram_transformer.",))
    patch = config.patch_size
    if not isinstance(patch, int):
        if len(set(patch)) != 1:
            raise ValueError(f"AST needs a square patch, got patch_size={patch}")
        patch = int(patch[0])
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != d:
        raise ValueError(f"head_dim {head_dim} x {config.num_attention_heads} heads != hidden_size {d}")
    tokenizer = AudioPatches(
        embed_dim=d,
        num_mel_bins=config.num_mel_bins,
        target_frames=config.max_length,
        patch_size=patch,
        fstride=config.frequency_stride,
        tstride=config.time_stride,
        class_token=True,
        dist_token=True,
        pos_embed="learned",
        normalize=normalize,
        norm_mean=norm_mean,
        norm_std=norm_std,
        **tokenizer_kwargs,
    )
    emb = {
        ours: hf_tensor(sd, f"embeddings.{theirs}", "AST")
        for ours, theirs in (
            ("proj.weight", "patch_embeddings.projection.weight"),
            ("proj.bias", "patch_embeddings.projection.bias"),
            ("cls_token", "cls_token"),
            ("dist_token", "distillation_token"),
            ("pos_embed", "position_embeddings"),
        )
    }
    load_exact(tokenizer, emb, "AST embeddings")
    backbone = timm_vit_blocks(
        d,
        config.num_hidden_layers,
        config.num_attention_heads,
        mlp_hidden_dim=config.intermediate_size,
        qkv_bias=config.qkv_bias,
        norm_eps=config.layer_norm_eps,
        act=hf_activation(config),
        name="ast_hf",
    )
    final = {k: hf_tensor(sd, f"layernorm.{k}", "AST") for k in ("weight", "bias")}
    load_hf_vit_layers(backbone, hf_vit_layers(sd, config.num_hidden_layers), final)
    return tokenizer, backbone
