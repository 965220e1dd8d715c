"""Builders: a validated config (dict or YAML path) -> `MMEncoder`; named presets as plain functions."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from adapters import create_adapter

from .config import load_config
from .heads import ClassifierHead
from .llm import load_blocks
from .models import LLMStage, MMEncoder, TimmViT

__all__ = ["build_encoder", "build_llm_stage", "vit_tiny_llm_last", "vit_small_llm_last", "num_classes_from_data"]

_BACKBONE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def num_classes_from_data(data_cfg: Mapping[str, Any]) -> int | None:
    """Class count from the shards' ``index.json`` (None when the shards do not exist yet)."""
    from .data import read_index

    index = read_index(data_cfg["root"])
    return len(index.class_names) if index is not None and index.class_names else None


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
        **llm_cfg["tune_kwargs"],
    )
    a_in, a_out = model_cfg["adapter_in"], model_cfg["adapter_out"]
    return LLMStage(
        create_adapter(a_in["name"], width, blocks.hidden_size, **a_in["kwargs"]),
        blocks,
        create_adapter(a_out["name"], blocks.hidden_size, width, **a_out["kwargs"]),
    )


def build_encoder(
    cfg: Mapping[str, Any] | str | os.PathLike, num_classes: int | None = None, verbose: bool = True
) -> MMEncoder:
    """An `MMEncoder` from a config (a dict or a YAML path; validated here).

    ``num_classes``: overrides ``model.num_classes``; by default read from the shards' ``index.json``.
    ``verbose``: print the table of trainable / frozen parameters per stage.
    """
    cfg = load_config(cfg)
    m = cfg["model"]
    bb = m["backbone"]
    kwargs = {k: bb[k] for k in _BACKBONE_KEYS if bb[k] is not None}
    kwargs.update(
        drop_path_rate=bb["drop_path_rate"],
        reg_tokens=bb["reg_tokens"],
        class_token=bb["class_token"],
        no_embed_class=bb["no_embed_class"],
        in_chans=cfg["data"]["channels"],
    )
    if not bb["class_token"]:
        kwargs["global_pool"] = "avg"
    backbone = TimmViT(bb["name"], checkpoint_path=bb["checkpoint_path"], **kwargs)
    llm_stage = build_llm_stage(m["llm"], m, backbone.embed_dim) if m["llm"]["enabled"] else None
    classes = num_classes or m["num_classes"] or num_classes_from_data(cfg["data"])
    head = None
    if classes:
        head = ClassifierHead(backbone.embed_dim, classes, pool=m["head"]["pool"], dropout=m["head"]["dropout"])
    encoder = MMEncoder(backbone.make_tokenizer(), backbone, llm_stage, head, insert_at=m["insert_at"])
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
