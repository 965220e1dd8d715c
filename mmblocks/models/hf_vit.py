"""HF ViT-style encoder weights (AST, VideoMAE, any model with ViT-style layers) -> timm blocks, exactly.

HF's separate q / k / v projections become timm's fused ``qkv``; both HF layouts (transformers 4:
``encoder.layer.{i}.attention.attention.query``, transformers 5: ``layers.{i}.attention.q_proj``) load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..layers.vit_blocks import HF_ACTIVATIONS

__all__ = [
    "hf_activation",
    "hf_tensor",
    "hf_vit_layers",
    "load_exact",
    "load_hf_vit_layers",
    "model_and_config",
    "strip_prefix",
]


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
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported here; supported: {sorted(HF_ACTIVATIONS)}")
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
