"""Audio Spectrogram Transformer (AST, Gong et al. 2021): `audio_patches` tokens + timm's own ViT blocks.

AST is DeiT over a log-mel spectrogram: overlapping 16x16 patches (stride 10 x 10), a cls and a distillation
token, learned absolute positions, pre-norm ViT blocks and a final LayerNorm. Here it is the `AudioPatches`
tokenizer (``class_token=True, dist_token=True``) plus a `TimmViT` without patch embedding (`timm_vit_blocks`:
timm's own ``Block`` instances, attention never rewritten, with HF's LayerNorm eps) whose final norm `MMEncoder`
applies after the LLM stage.

- `ast_from_hf(model)` converts a Hugging Face ``ASTModel`` / ``ASTForAudioClassification`` (or a state dict and
  its ``ASTConfig``) into ``(AudioPatches, TimmViT)``; ``MMEncoder(tok, backbone).forward_features(fbank)``
  then equals ``ASTModel(input_values).last_hidden_state``.
- `ast_backbone(...)` builds a from-scratch AST of any width / depth / heads (`AST_PRESETS` names the usual ones).

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

`timm_vit_blocks`, `hf_vit_layers` and `load_hf_vit_layers` also serve `mmblocks.models.videomae` (any HF model with
ViT-style layers).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import LayerNorm, QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tokenizers_mm import AudioPatches

from .backbones import TimmViT

__all__ = [
    "AST_PRESETS",
    "ast_backbone",
    "ast_from_hf",
    "hf_tensor",
    "hf_vit_layers",
    "load_exact",
    "load_hf_vit_layers",
    "timm_vit_blocks",
]

# HF `hidden_act` names -> activation modules that compute the same function.
_ACTIVATIONS: dict[str, Any] = {
    "gelu": nn.GELU,
    "gelu_new": functools.partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


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
) -> TimmViT:
    """A `TimmViT` without patch embedding: timm's own ``VisionTransformer`` blocks and final norm, sized here.

    The blocks are `timm.models.vision_transformer.Block` (attention never rewritten); this only chooses their
    sizes, LayerNorm eps and activation, so HF checkpoints (eps 1e-12, ``gelu``) load exactly. The ViT's embedding
    is dropped (``image_tokenizer=False``): another modality's tokenizer feeds the blocks. timm's ViT init.

    Args:
        embed_dim, depth, num_heads: transformer size (``embed_dim % num_heads == 0``).
        mlp_hidden_dim: MLP width (default ``4 * embed_dim``).
        qkv_bias: biases on the fused qkv projection.
        norm_eps: LayerNorm eps of every norm (timm: 1e-6; HF AST / VideoMAE: 1e-12).
        act: HF-style activation name (``gelu``, ``gelu_new``, ``gelu_pytorch_tanh``, ``quick_gelu``, ``relu``,
            ``silu``).
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        final_norm: a final LayerNorm (False: ``nn.Identity``, e.g. VideoMAE with mean pooling).
        name: the name `TimmViT` reports.
    """
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
    if act not in _ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
    hidden = 4 * embed_dim if mlp_hidden_dim is None else int(mlp_hidden_dim)
    # timm sizes the MLP as int(dim * mlp_ratio): nudge the ratio so that lands exactly on `hidden`.
    mlp_ratio = hidden / embed_dim
    if int(embed_dim * mlp_ratio) != hidden:
        mlp_ratio = (hidden + 0.5) / embed_dim
    config = dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        drop_path_rate=drop_path_rate,
        final_norm=final_norm,
    )
    # A 1x1 single-channel patch embedding, no tokens, no positions: only the blocks and norms are kept.
    vit = VisionTransformer(
        img_size=1,
        patch_size=1,
        in_chans=1,
        num_classes=0,
        global_pool="",
        class_token=False,
        pos_embed="none",
        norm_layer=functools.partial(LayerNorm, eps=norm_eps),
        act_layer=_ACTIVATIONS[act],
        **config,
    )
    backbone = TimmViT(name, vit=vit, image_tokenizer=False)
    backbone.timm_config = {"name": name, **config, "norm_eps": norm_eps, "act": act}
    return backbone


def load_hf_vit_layers(
    backbone: nn.Module, layers: list[dict[str, torch.Tensor | None]], final_norm: Mapping | None = None
) -> None:
    """Copy HF ViT-style layers into timm blocks (exact: the same function in another parameter layout).

    Each entry of `layers` maps the roles ``q k v o fc1 fc2 ln1 ln2`` + ``.weight`` / ``.bias`` to tensors
    (`hf_vit_layers` collects them). HF's separate q / k / v projections become timm's fused ``qkv = [q; k; v]``;
    a missing bias (VideoMAE has none on k) becomes zeros, which changes nothing (a constant added to every key
    shifts all scores of a query equally, and softmax ignores that). `final_norm` (``weight``, ``bias``) goes to
    ``backbone.norm``.
    """
    blocks = backbone.blocks
    if len(layers) != len(blocks):
        raise ValueError(f"got {len(layers)} HF layers for a backbone of depth {len(blocks)}")
    for i, (block, p) in enumerate(zip(blocks, layers)):
        qkv_w = torch.cat([p["q.weight"], p["k.weight"], p["v.weight"]], dim=0)
        biases = [p.get(f"{r}.bias") for r in "qkv"]
        sd = {
            "norm1.weight": p["ln1.weight"],
            "norm1.bias": p["ln1.bias"],
            "attn.qkv.weight": qkv_w,
            "attn.proj.weight": p["o.weight"],
            "attn.proj.bias": p["o.bias"],
            "norm2.weight": p["ln2.weight"],
            "norm2.bias": p["ln2.bias"],
            "mlp.fc1.weight": p["fc1.weight"],
            "mlp.fc1.bias": p["fc1.bias"],
            "mlp.fc2.weight": p["fc2.weight"],
            "mlp.fc2.bias": p["fc2.bias"],
        }
        has_bias = block.attn.qkv.bias is not None
        if any(b is not None for b in biases):
            if not has_bias:
                raise ValueError(f"HF layer {i} has q/k/v biases but the blocks were built with qkv_bias=False")
            sd["attn.qkv.bias"] = torch.cat(
                [b if b is not None else qkv_w.new_zeros(p[f"{r}.weight"].shape[0]) for r, b in zip("qkv", biases)]
            )
        elif has_bias:
            sd["attn.qkv.bias"] = qkv_w.new_zeros(qkv_w.shape[0])
        load_exact(block, sd, f"block {i}")
    if final_norm is not None:
        if isinstance(backbone.norm, nn.Identity):
            raise ValueError("the HF model has a final LayerNorm but the backbone was built with final_norm=False")
        load_exact(backbone.norm, final_norm, "final norm")


def load_exact(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with the shapes checked first (an error names `what` and both shapes)."""
    own = module.state_dict()
    for k, v in sd.items():
        if k not in own:
            raise KeyError(f"{what}: no parameter {k!r} here (have {sorted(own)})")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{what}: {k} has shape {tuple(v.shape)} in the HF weights, {tuple(own[k].shape)} here")
    module.load_state_dict(dict(sd), strict=True)


# HF names of each role inside one layer, old (transformers 4: `encoder.layer.i.attention.attention.query`) and
# new (transformers 5: `layers.i.attention.q_proj`) layouts, plus VideoMAE's `q_bias` / `v_bias` parameters.
_ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "o": ("attention.o_proj", "attention.output.dense"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
    "ln1": ("layernorm_before",),
    "ln2": ("layernorm_after",),
}
_BIAS_PARAMS = {"q": "attention.attention.q_bias", "v": "attention.attention.v_bias"}
_LAYER_PREFIX = re.compile(r"^(?:layers|encoder\.layer)\.(\d+)\.")


def hf_tensor(state_dict: Mapping[str, torch.Tensor], key: str, model: str) -> torch.Tensor:
    """``state_dict[key]``, or a `KeyError` that says which model's weights lack it."""
    if key not in state_dict:
        raise KeyError(f"the {model} weights have no {key!r} (keys start with {sorted(state_dict)[:4]} ...)")
    return state_dict[key]


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The state dict of the base model: keys under the first of `prefixes` present (a task model's base) lose it;
    without any, the dict is returned as is."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def hf_vit_layers(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> list[dict[str, torch.Tensor | None]]:
    """The per-layer tensors of an HF ViT-style encoder, by role (see `load_hf_vit_layers`).

    Accepts both HF layouts (``encoder.layer.{i}.attention.attention.query`` and ``layers.{i}.attention.q_proj``).
    Raises if the state dict holds another number of layers than `num_layers` or a tensor is missing.
    """
    found = {int(m.group(1)) for k in state_dict if (m := _LAYER_PREFIX.match(k))}
    if found != set(range(num_layers)):
        raise ValueError(f"the HF weights hold layers {sorted(found)}, the config says num_hidden_layers={num_layers}")
    out = []
    for i in range(num_layers):
        prefixes = [p for p in (f"layers.{i}.", f"encoder.layer.{i}.") if any(k.startswith(p) for k in state_dict)]
        layer: dict[str, torch.Tensor | None] = {}
        for role, names in _ROLE_NAMES.items():
            for kind in ("weight", "bias"):
                keys = [f"{p}{n}.{kind}" for p in prefixes for n in names]
                if kind == "bias" and role in _BIAS_PARAMS:
                    keys += [f"{p}{_BIAS_PARAMS[role]}" for p in prefixes]
                hit = next((k for k in keys if k in state_dict), None)
                if hit is None and (kind == "weight" or role not in ("q", "k", "v")):
                    raise KeyError(f"HF layer {i}: no {role}.{kind} among {keys}")
                layer[f"{role}.{kind}"] = state_dict[hit] if hit is not None else None
        out.append(layer)
    return out


def hf_activation(config: Any) -> str:
    act = getattr(config, "hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported here; supported: {sorted(_ACTIVATIONS)}")
    return act


def model_and_config(model: Any, config: Any, base_attr: str) -> tuple[dict[str, torch.Tensor], Any]:
    """``(state_dict, config)`` from an HF model (base or task model) or a state dict plus its config."""
    if isinstance(model, nn.Module):
        config = model.config if config is None else config
        base = getattr(model, base_attr, model)
        return dict(base.state_dict()), config
    if isinstance(model, Mapping):
        if config is None:
            raise ValueError("converting a state dict needs its HF config (config=...)")
        return dict(model), config
    raise TypeError(f"expected an HF model or a state dict, got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------------------- AST

#: DeiT sizes, as AST is DeiT over spectrograms (AST itself is ``ast_base``).
AST_PRESETS: dict[str, dict[str, int]] = {
    "ast_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "ast_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "ast_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}


def ast_backbone(
    preset: str | None = None,
    *,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    num_mel_bins: int = 128,
    target_frames: int = 1024,
    patch_size: int = 16,
    fstride: int = 10,
    tstride: int = 10,
    class_token: bool = True,
    dist_token: bool = True,
    drop_path_rate: float = 0.0,
    norm_eps: float = 1e-6,
    **tokenizer_kwargs: Any,
) -> tuple[AudioPatches, TimmViT]:
    """A from-scratch AST: ``(AudioPatches, TimmViT)``, randomly initialised (timm's ViT init).

    `preset` (a key of `AST_PRESETS`) sets ``embed_dim / depth / num_heads`` (explicit values of those three are
    then ignored; pass no preset to size it yourself). ``target_frames=1024, fstride=tstride=10`` gives AST's
    ``12 x 101`` grid; 512 frames (ESC-50) gives ``12 x 50``. `tokenizer_kwargs` go to `AudioPatches`
    (``normalize``, ``norm_mean``, ``norm_std``, ``sample_rate``, ``fbank_kwargs``, ...).
    """
    if preset is not None:
        if preset not in AST_PRESETS:
            raise ValueError(f"unknown AST preset {preset!r}; presets: {sorted(AST_PRESETS)}")
        embed_dim, depth, num_heads = (AST_PRESETS[preset][k] for k in ("embed_dim", "depth", "num_heads"))
    tokenizer = AudioPatches(
        embed_dim=embed_dim,
        num_mel_bins=num_mel_bins,
        target_frames=target_frames,
        patch_size=patch_size,
        fstride=fstride,
        tstride=tstride,
        class_token=class_token,
        dist_token=dist_token,
        **tokenizer_kwargs,
    )
    backbone = timm_vit_blocks(
        embed_dim,
        depth,
        num_heads,
        mlp_hidden_dim=int(embed_dim * mlp_ratio),
        drop_path_rate=drop_path_rate,
        norm_eps=norm_eps,
        name=preset or "ast",
    )
    return tokenizer, backbone


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
