"""Builders: a validated config (dict or YAML path) -> `MMEncoder`; named presets as plain functions."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters import create_adapter
from tokenizers_mm import create_tokenizer

from .config import ConfigError, load_config
from .heads import ClassifierHead
from .llm import load_blocks
from .models import CausalViT, LLMStage, MMEncoder, PointTransformer, TimmViT

__all__ = [
    "build_encoder",
    "build_llm_stage",
    "build_tokenizer_and_backbone",
    "freeze_stages",
    "load_encoder_weights",
    "vit_tiny_llm_last",
    "vit_small_llm_last",
    "num_classes_from_data",
]

_BACKBONE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def num_classes_from_data(data_cfg: Mapping[str, Any]) -> int | None:
    """Class count from the shards' ``index.json`` (None when the shards do not exist yet)."""
    from .data import read_index

    index = read_index(data_cfg["root"])
    return len(index.class_names) if index is not None and index.class_names else None


def _create_tokenizer(name: str, **kwargs: Any) -> nn.Module:
    try:
        return create_tokenizer(name, **kwargs)
    except TypeError as err:  # a misspelt or foreign argument: name the config keys
        raise ConfigError(f"model.tokenizer.kwargs for {name!r}: {err}") from err


def build_tokenizer_and_backbone(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """The tokenizer and backbone a validated ``model`` config names.

    * ``backbone.type: vit`` with no tokenizer (or ``image_patches``): a timm ViT and its own patch embedding.
    * ``backbone.type: vit`` with another tokenizer (``audio_patches`` = AST, ``video_tubelets`` = VideoMAE,
      ``motion``, ``keyframe_motion``, ``audio_frames``): timm ViT blocks (no patch embedding) after that tokenizer,
      built with ``embed_dim`` = the ViT width and ``model.tokenizer.kwargs``.
    * ``backbone.type: point_transformer``: Point-BERT's transformer after the ``points`` tokenizer (built with
      ``add_pos=False``: the backbone adds the centre positions before every block).
    """
    bb, tok = model_cfg["backbone"], model_cfg["tokenizer"]
    name, tok_kwargs = tok["name"], dict(tok["kwargs"])
    if bb["type"] == "causal_vit":
        if name not in (None, "image_patches") or tok_kwargs:
            raise ConfigError("model.tokenizer: causal_vit uses its own patch embedding (set sizes in model.backbone)")
        backbone = CausalViT(
            bb["size"],
            img_size=bb["img_size"] or 224,
            patch_size=bb["patch_size"] or 16,
            in_chans=data_cfg["channels"],
            embed_dim=bb["embed_dim"],
            depth=bb["depth"],
            num_heads=bb["num_heads"],
            attention=bb["attention"],
            causal_impl=bb["causal_impl"],
            soft_mask=bb["soft_mask"],
            cls_position=bb["cls_position"],
            rope=bb["rope"],
            rope_theta=bb["rope_theta"],
            rope_train_grid=bb["rope_train_grid"],
            drop_path_rate=bb["drop_path_rate"],
        )
        return backbone.make_tokenizer(), backbone
    if bb["type"] == "point_transformer":
        if name not in (None, "points"):
            raise ConfigError(f"model.tokenizer.name: backbone.type point_transformer needs 'points', got {name!r}")
        width = bb["embed_dim"] or 384
        backbone = PointTransformer(
            embed_dim=width,
            depth=bb["depth"] or 12,
            num_heads=bb["num_heads"] or 6,
            mlp_ratio=bb["mlp_ratio"] or 4.0,
            drop_path_rate=bb["drop_path_rate"],
            class_token=bb["class_token"],
        )
        tokenizer = _create_tokenizer(
            "points", **{"embed_dim": width, "class_token": bb["class_token"], "add_pos": False, **tok_kwargs}
        )
        return tokenizer, backbone
    kwargs = {k: bb[k] for k in _BACKBONE_KEYS if bb[k] is not None}
    kwargs["drop_path_rate"] = bb["drop_path_rate"]
    if name in (None, "image_patches"):
        if tok_kwargs:
            raise ConfigError(
                "model.tokenizer.kwargs: the image tokenizer is the ViT's own patch embedding; set its size with "
                f"model.backbone (img_size, patch_size, ...), got {sorted(tok_kwargs)}"
            )
        kwargs.update(
            reg_tokens=bb["reg_tokens"],
            class_token=bb["class_token"],
            no_embed_class=bb["no_embed_class"],
            in_chans=data_cfg["channels"],
        )
        if not bb["class_token"]:
            kwargs["global_pool"] = "avg"
        backbone = TimmViT(bb["name"], checkpoint_path=bb["checkpoint_path"], **kwargs)
        return backbone.make_tokenizer(), backbone
    for key in ("img_size", "patch_size"):  # sizes belong to the tokenizer here
        kwargs.pop(key, None)
    backbone = TimmViT(bb["name"], checkpoint_path=bb["checkpoint_path"], image_tokenizer=False, **kwargs)
    return _create_tokenizer(name, **{"embed_dim": backbone.embed_dim, **tok_kwargs}), backbone


def build_llm_stage(llm_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], width: int) -> LLMStage:
    """``adapter_in -> load_blocks(...) -> adapter_out`` for an encoder of width `width`."""
    blocks = load_blocks(
        llm_cfg["source"],
        llm_cfg["layers"],
        attention=llm_cfg["attention"],
        rope=llm_cfg["rope"],
        final_norm=llm_cfg["final_norm"],
        tune=llm_cfg["tune"],
        dtype=llm_cfg["dtype"],
        attn_implementation=llm_cfg["attn_implementation"],
        config_overrides=llm_cfg["config_overrides"] or None,
        seed=llm_cfg["seed"],
        causal_impl=llm_cfg["causal_impl"],
        soft_mask=llm_cfg["soft_mask"],
        rope_theta=llm_cfg["rope_theta"],
        rope_train_grid=llm_cfg["rope_train_grid"],
        **llm_cfg["tune_kwargs"],
    )
    a_in, a_out = model_cfg["adapter_in"], model_cfg["adapter_out"]
    return LLMStage(
        create_adapter(a_in["name"], width, blocks.hidden_size, **a_in["kwargs"]),
        blocks,
        create_adapter(a_out["name"], blocks.hidden_size, width, **a_out["kwargs"]),
    )


#: Encoder stages a config may initialise from a checkpoint or freeze (attribute prefixes of `MMEncoder`).
ENCODER_STAGES = ("tokenizer", "backbone", "llm_stage", "head")


def _prefixes(stages: Sequence[str]) -> tuple[str, ...]:
    bad = [s for s in stages if s not in ENCODER_STAGES]
    if bad:
        raise ConfigError(f"unknown encoder stage(s) {bad}; stages are {list(ENCODER_STAGES)}")
    return tuple(f"{s}." for s in stages)


def load_encoder_weights(
    encoder: MMEncoder, checkpoint: str | os.PathLike, stages: Sequence[str] = ENCODER_STAGES
) -> list[str]:
    """Copy the weights of `stages` from an mmblocks checkpoint (a ``step-*`` folder, a ``checkpoints`` folder (its
    latest) or a ``model.safetensors`` file) into `encoder`; returns the names loaded.

    Only tensors of the named stages are read (e.g. a trained tokenizer + backbone under a new head or a new LLM
    stage). A shape mismatch, or a stage with nothing to load, is an error."""
    from safetensors.torch import load_file

    from .train.checkpoint import MODEL_FILE, latest_checkpoint

    path = Path(checkpoint).expanduser()
    if path.is_dir():
        folder = path if (path / MODEL_FILE).is_file() else latest_checkpoint(path)
        if folder is None:
            raise FileNotFoundError(f"{path} holds no complete checkpoint")
        path = folder / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights {path} not found")
    stored = load_file(str(path))
    prefixes = _prefixes(stages)
    own = {**dict(encoder.named_parameters()), **dict(encoder.named_buffers())}
    loaded = []
    with torch.no_grad():
        for name, value in stored.items():
            if not name.startswith(prefixes) or name not in own:
                continue
            if own[name].shape != value.shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(value.shape)}, the encoder {tuple(own[name].shape)} "
                    "(build the encoder with the configuration that trained the checkpoint)"
                )
            own[name].copy_(value)
            loaded.append(name)
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in loaded) and any(n.startswith(prefix) for n in own):
            raise ValueError(f"{path} holds no weights for stage {prefix[:-1]!r} of this encoder")
    return loaded


def freeze_stages(encoder: MMEncoder, stages: Sequence[str]) -> None:
    """Turn off gradients of the named stages (a frozen pretrained tower under a trained adapter, ...); frozen
    stages also run in eval mode (no dropout, drop-path or BatchNorm updates) whatever the encoder's mode."""
    prefixes = _prefixes(stages)
    for name, param in encoder.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    encoder.frozen_stages = tuple(stages)
    encoder.train(encoder.training)


def build_encoder(
    cfg: Mapping[str, Any] | str | os.PathLike, num_classes: int | None = None, verbose: bool = True
) -> MMEncoder:
    """An `MMEncoder` from a config (a dict or a YAML path; validated here).

    ``num_classes``: overrides ``model.num_classes``; by default read from the shards' ``index.json``.
    ``verbose``: print the table of trainable / frozen parameters per stage.
    """
    cfg = load_config(cfg)
    m = cfg["model"]
    tokenizer, backbone = build_tokenizer_and_backbone(m, cfg["data"])
    llm_stage = build_llm_stage(m["llm"], m, backbone.embed_dim) if m["llm"]["enabled"] else None
    classes = num_classes or m["num_classes"] or num_classes_from_data(cfg["data"])
    head = None
    if classes:
        pool = m["head"]["pool"] or getattr(backbone, "readout", "cls")
        head = ClassifierHead(backbone.embed_dim, classes, pool=pool, dropout=m["head"]["dropout"])
    encoder = MMEncoder(tokenizer, backbone, llm_stage, head, insert_at=m["insert_at"])
    init = m["init"]
    if init["checkpoint"] is not None:
        load_encoder_weights(encoder, init["checkpoint"], stages=init["stages"])
    freeze_stages(encoder, m["freeze"])
    if verbose:
        print(encoder.parameter_table())
    return encoder


def _preset(
    num_classes: int, backbone: str, img_size: int, patch_size: int, llm: bool, source: str, tune: str, **overrides: Any
) -> MMEncoder:
    cfg: dict[str, Any] = {
        "model": {
            "backbone": {"name": backbone, "img_size": img_size, "patch_size": patch_size},
            "llm": {"enabled": llm, "source": source, "tune": tune},
            "num_classes": num_classes,
        }
    }
    for key, value in overrides.items():
        cfg["model"][key] = value
    return build_encoder(cfg)


def vit_tiny_llm_last(
    num_classes: int,
    img_size: int = 224,
    patch_size: int = 16,
    llm: bool = True,
    source: str = "smollm2-135m",
    tune: str = "frozen",
    **model: Any,
) -> MMEncoder:
    """ViT-Tiny with the last block of `source` after its last block (the center paper's wiring)."""
    return _preset(num_classes, "vit_tiny_patch16_224", img_size, patch_size, llm, source, tune, **model)


def vit_small_llm_last(
    num_classes: int,
    img_size: int = 224,
    patch_size: int = 16,
    llm: bool = True,
    source: str = "smollm2-135m",
    tune: str = "frozen",
    **model: Any,
) -> MMEncoder:
    """ViT-Small with the last block of `source` after its last block (the center paper's ImageNet setting)."""
    return _preset(num_classes, "vit_small_patch16_224", img_size, patch_size, llm, source, tune, **model)
