"""Discover how to reach and call the layers of any `transformers` decoder from the module tree itself.

The architecture is built on the ``meta`` device from its config (nothing is allocated): the causal-LM class
where `transformers` registers one (so its checkpoint-key layout and weight conversions are the ones
`from_pretrained` uses), else the base model. In that tree `discover` finds:

* the decoder (``model.get_decoder()``) and, inside it, the layer stack: the `nn.ModuleList` whose elements
  are all instances of the classes named in ``_no_split_modules`` (the unit `transformers` never splits across
  devices, i.e. the layer), preferring the one of length ``num_hidden_layers`` outside vision / audio towers;
  without ``_no_split_modules``, the list of ``num_hidden_layers`` identical modules;
* the final norm (the decoder's last norm child registered after the stack), the rotary module (the
  decoder's module whose class name contains ``Rotary``), the attention and MLP children of a layer and the
  projections that write into the residual stream (for block expansion);
* how positions enter: ``rotary`` (cos/sin passed to the layers), ``inside`` (the layer rotates by
  ``position_ids`` itself), ``absolute`` (added to the embeddings outside the layers) or an entry's own
  (``alibi``);
* whether the layers are encoder layers (no attention module is causal in its own model).

What cannot be read from the tree lives in `mmblocks.llm.families.ENTRIES`, each entry with its reason.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..layers.norms import is_norm_module
from .families import ENTRIES, FamilySpec, UnknownFamilyError

__all__ = [
    "build_meta_model",
    "is_attention_type",
    "discover",
    "get_family",
    "iter_causal_lm_types",
    "list_families",
    "tiny_config",
]

# Names of the projections that write a sub-layer's output into the residual stream, across families.
RESIDUAL_OUT_NAMES = frozenset(
    {"o_proj", "out_proj", "dense", "c_proj", "down_proj", "fc2", "dense_4h_to_h", "wo", "w2", "proj", "fc_out"}
)
_TOWERS = ("vision", "visual", "audio", "image", "speech", "encoder.", "img_", "mm_")
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
_CONFIG_EPS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon")


# --------------------------------------------------------------------------------------------- building
def _model_classes(config: PretrainedConfig) -> list[Any]:
    """The causal-LM and base classes of `config`; a sub-config (Emu3's or Mllama's text config, saved by their
    causal LM) is looked up through the model types defined beside it."""
    from transformers.models.auto.configuration_auto import (
        CONFIG_MAPPING,
        CONFIG_MAPPING_NAMES,
        model_type_to_module_name,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    out = []
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING):
        try:
            out.append(mapping[type(config)])
        except KeyError:
            continue
    if not out:
        package = type(config).__module__.split(".")[-2]  # transformers.models.<package>.configuration_<package>
        for name in CONFIG_MAPPING_NAMES:
            if model_type_to_module_name(name) != package:
                continue
            try:
                cls = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[name]]
            except KeyError:
                continue
            if getattr(cls, "config_class", None) is type(config):
                out.append(cls)
                break
    return out


def causal_lm_encoder(config: PretrainedConfig) -> bool:
    """BERT-style configs (``is_decoder`` False) are encoders: build their base model, as their checkpoints are."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

    masked_lm = type(config) in MODEL_FOR_MASKED_LM_MAPPING
    return masked_lm and not getattr(config, "is_decoder", False) and not getattr(config, "is_encoder_decoder", False)


def build_meta_model(config: PretrainedConfig) -> nn.Module:
    """The architecture of `config` with parameters on ``meta`` (buffers, e.g. rotary frequencies, are real).

    The causal-LM class is preferred (its key layout is the checkpoint's); masked-LM encoders build the base model.
    """
    classes = _model_classes(config)
    if not classes:
        raise UnknownFamilyError(
            f"transformers has no causal-LM or base model class for config {type(config).__name__} "
            f"(model_type {config.model_type!r})"
        )
    if causal_lm_encoder(config) and len(classes) > 1:
        classes = classes[1:]
    cls = classes[0]
    wanted = getattr(cls, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        text = config.get_text_config()
        if isinstance(text, wanted):
            config = text
    with init_empty_weights(include_buffers=False):
        return cls._from_config(config)


# --------------------------------------------------------------------------------------------- discovery helpers
def _no_split_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    return names


def _decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """The decoder module (``model.get_decoder()``) and its path in `model`."""
    dec = None
    getter = getattr(model, "get_decoder", None)
    if getter is not None:
        try:
            dec = getter()
        except (AttributeError, NotImplementedError, ValueError):
            dec = None
    from transformers import PreTrainedModel

    if not isinstance(dec, PreTrainedModel):  # ModernBERT-decoder's get_decoder() is its LM head
        dec = getattr(model, "base_model", model)
    for path, m in model.named_modules():
        if m is dec:
            return path, dec
    return "", model


def _num_layers(config: PretrainedConfig) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _stack_candidates(decoder: nn.Module, names: set[str]) -> list[tuple[str, nn.ModuleList]]:
    out = []
    for path, m in decoder.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if names:
            if all(type(x).__name__ in names for x in m):
                out.append((path, m))
        elif len({type(x) for x in m}) == 1 and any(True for _ in m[0].parameters()):
            out.append((path, m))
    return out


def _in_tower(path: str) -> bool:
    return any(t in path.lower() for t in _TOWERS) and not path.startswith(("encoder.layer", "layers"))


def find_layer_stack(decoder: nn.Module, config: PretrainedConfig, names: set[str]) -> tuple[str, nn.ModuleList]:
    """The decoder-layer `nn.ModuleList` inside `decoder` (see the module docstring); errors say what was looked for."""
    n = _num_layers(config)
    cands = _stack_candidates(decoder, names) or (_stack_candidates(decoder, set()) if names else [])
    if not cands:
        raise UnknownFamilyError(
            f"cannot find the layer stack of {config.model_type!r} in {type(decoder).__name__}: looked for an "
            f"nn.ModuleList whose elements are all of the classes in _no_split_modules ({sorted(names) or 'none'}) "
            f"or, failing that, {n} identical modules with parameters"
        )

    def score(item: tuple[str, nn.ModuleList]) -> tuple:
        path, m = item
        return (not _in_tower(path), len(m) == n, len(m), -path.count("."))

    best = max(cands, key=score)
    tied = [c for c in cands if score(c) == score(best) and c[0] != best[0]]
    if tied:
        raise UnknownFamilyError(
            f"{config.model_type!r} has several candidate layer stacks ({best[0]!r}, "
            f"{', '.join(repr(t[0]) for t in tied)}) and nothing tells them apart; it needs an entry in "
            "mmblocks/llm/families.py"
        )
    return best


def _outside(decoder: nn.Module, stack: nn.ModuleList) -> Iterator[tuple[str, nn.Module]]:
    inside = {id(m) for m in stack.modules()}
    for path, m in decoder.named_modules():
        if id(m) not in inside and path:
            yield path, m


def find_final_norm(decoder: nn.Module, stack_path: str) -> str | None:
    """The last norm registered after the layer stack in the module that holds it (``norm``, ``ln_f``,
    ``final_layernorm``); failing that (OPT registers it first), a norm named like a final one."""
    parent_path, _, top = stack_path.rpartition(".")
    parent = decoder.get_submodule(parent_path) if parent_path else decoder
    prefix = f"{parent_path}." if parent_path else ""
    seen_stack = False
    found = None
    for name, child in parent.named_children():
        if name == top:
            seen_stack = True
            continue
        if seen_stack and is_norm_module(child) and "embed" not in name:  # Bart's layernorm_embedding comes first
            found = name
    if found is None:
        named = [n for n, c in parent.named_children() if is_norm_module(c) and "embed" not in n]
        found = next((n for n in named if "final" in n or n in ("ln_f", "norm", "norm_f")), None)
    return prefix + found if found is not None else None


def find_rotary(decoder: nn.Module, stack: nn.ModuleList) -> str | None:
    """The decoder's rotary-embedding module outside the layers (``rotary_emb`` first)."""
    cands = [p for p, m in _outside(decoder, stack) if "Rotary" in type(m).__name__ and "." not in p]
    if not cands:
        cands = [p for p, m in _outside(decoder, stack) if "Rotary" in type(m).__name__]
    if not cands:
        return None
    return "rotary_emb" if "rotary_emb" in cands else cands[0]


def _attention_child(layer: nn.Module) -> str | None:
    for name, child in layer.named_children():
        if "attention" in type(child).__name__.lower() or name in ("self_attn", "attn", "attention", "self_attention"):
            return name
    return None


def _mlp_children(layer: nn.Module, attn: str | None) -> tuple[str, ...]:
    skip = {attn}
    out = []
    for name, child in layer.named_children():
        if name in skip or is_norm_module(child) or isinstance(child, nn.Dropout):
            continue
        if "attention" in type(child).__name__.lower() or "attn" in name:
            continue
        if any(True for _ in child.parameters()):
            out.append(name)
    return tuple(out)


def _residual_outputs(layer: nn.Module, roots: tuple[str, ...]) -> tuple[str, ...]:
    """Parameter paths (relative to the layer) named like a residual-stream output projection: a linear's
    weight and bias (``o_proj``, ``down_proj`` ...) or a fused experts tensor (``experts.down_proj``)."""
    out = []
    for name, _ in layer.named_parameters():
        if not any(name == r or name.startswith(r + ".") for r in roots if r):
            continue
        parts = name.split(".")
        owner = parts[-2] if len(parts) > 1 else ""
        if owner in RESIDUAL_OUT_NAMES or parts[-1] in RESIDUAL_OUT_NAMES:
            out.append(name)
    return tuple(out)


def residual_outputs(layer: nn.Module) -> tuple[str, ...]:
    """The residual-stream output parameters of this layer (layers of one model differ: dense and MoE layers,
    attention and state-space layers)."""
    attn = _attention_child(layer)
    return _residual_outputs(layer, ((attn,) if attn else ()) + _mlp_children(layer, attn))


def _is_encoder(config: PretrainedConfig, layer: nn.Module) -> bool:
    """BERT-style bidirectional layers: a config that says it is not a decoder (``is_decoder`` False, not
    encoder-decoder) and is a masked-LM architecture or has attention modules, none of them causal. Neither test
    suffices alone: GPT-NeoX's config also says ``is_decoder`` False, and Bart-like decoders keep ``is_causal``
    False while their model passes a causal mask."""
    if getattr(config, "is_decoder", None) is not False or getattr(config, "is_encoder_decoder", False):
        return False
    flags = [m.is_causal for m in layer.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return causal_lm_encoder(config) or (bool(flags) and not any(flags))


def _eps(norm: nn.Module | None, config: PretrainedConfig) -> float:
    if norm is not None:
        for attr in _EPS_ATTRS:
            value = getattr(norm, attr, None)
            if isinstance(value, float):
                return value
    for attr in _CONFIG_EPS:
        value = getattr(config, attr, None)
        if isinstance(value, float):
            return value
    return 1e-6


def _norm_kind(norm: nn.Module | None) -> str:
    if norm is None:
        return "-"
    if isinstance(norm, nn.LayerNorm) or "LayerNorm" in type(norm).__name__:
        return "layer"
    return "rms"


def _forward_params(layer: nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(layer.forward).parameters)


def is_attention_type(layer_type: str) -> bool:
    """Layer types LLMBlocks runs: softmax attention over all (``full_attention``, DeepSeek's
    ``indexed_attention``, compressed / sparse variants) or windowed (``sliding_attention``) keys. Not: linear
    attention, state-space, convolution, hybrid (an SSM branch beside the attention) or chunked layers."""
    excluded = ("linear", "chunked", "hybrid", "conv", "mamba", "recurrent", "cross")
    return layer_type.endswith("attention") and not any(x in layer_type for x in excluded)


#: layer arguments LLMBlocks supplies itself
SUPPLIED = ("hidden_states", "attention_mask", "position_embeddings", "position_ids")


def _required_unsupplied(params: dict[str, inspect.Parameter], extra: tuple[str, ...]) -> list[str]:
    out = []
    for i, (name, p) in enumerate(params.items()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if i == 0 or name in SUPPLIED or name in extra:
            continue
        out.append(name)
    return out


# --------------------------------------------------------------------------------------------- discover
def discover(config: PretrainedConfig, model: nn.Module | None = None) -> FamilySpec:
    """The `FamilySpec` of `config`'s architecture, read from its module tree (plus its entry, if any).
    ``model_type`` is the config's own (GPT-SW3 runs GPT-2's classes but stays ``gpt-sw3``)."""
    entry = ENTRIES.get(config.model_type)
    model = model if model is not None else build_meta_model(config)
    decoder_path, decoder = _decoder(model)
    if entry is not None and entry.layers is not None:
        stack_path, stack = entry.layers, decoder.get_submodule(entry.layers)
    else:
        stack_path, stack = find_layer_stack(decoder, config, _no_split_names(model))
    layer = stack[0]
    final_norm = find_final_norm(decoder, stack_path)
    rotary = find_rotary(decoder, stack)
    params = _forward_params(layer)
    extra = tuple(entry.layer_args) if entry is not None else ()
    attn = _attention_child(layer)
    mlp = _mlp_children(layer, attn)
    if entry is not None and entry.positions:
        positions = entry.positions
    elif rotary is not None and "position_embeddings" in params:
        positions = "rotary"
    elif any("Rotary" in type(m).__name__ for m in layer.modules()) or (
        "position_ids" in params and not _absolute_outside(decoder, stack)
    ):
        positions = "inside"
    else:
        positions = "absolute"
    norm_module = decoder.get_submodule(final_norm) if final_norm else None
    spec = FamilySpec(
        model_type=config.model_type,
        decoder=decoder_path,
        layers=stack_path,
        final_norm=final_norm,
        rotary=rotary if positions == "rotary" else None,
        positions=positions,
        norm=_norm_kind(norm_module or next((m for m in layer.modules() if is_norm_module(m)), None)),
        attn=attn or "",
        mlp=mlp,
        residual_out=residual_outputs(layer),
        sliding_all=getattr(config, "layer_types", None) is None
        and isinstance(getattr(config, "sliding_window", None), int),
        eps=_eps(norm_module, config),
        encoder=_is_encoder(config, layer),
        layer_class=type(layer).__name__,
        model_class=type(model).__name__,
        moe=any(_is_moe(m) for m in stack),
        needs=tuple(_required_unsupplied(params, extra)),
        entry=entry.reason if entry is not None else None,
        layer_args=extra,
        mask=entry.mask if entry is not None else "additive",
    )
    return spec


def _absolute_outside(decoder: nn.Module, stack: nn.ModuleList) -> bool:
    """A position-embedding table outside the layers (``wpe``, ``embed_positions``, ``position_embeddings``)."""
    for path, m in _outside(decoder, stack):
        name = path.rsplit(".", 1)[-1]
        if isinstance(m, nn.Embedding) and ("pos" in name or name == "wpe"):
            return True
        if "PositionalEmbedding" in type(m).__name__ or "PositionEmbedding" in type(m).__name__:
            return True
    return False


def _is_moe(layer: nn.Module) -> bool:
    for name, m in layer.named_modules():
        if name.rsplit(".", 1)[-1] in ("experts", "block_sparse_moe") or "Experts" in type(m).__name__:
            return True
    return False


@functools.lru_cache(maxsize=512)
def get_family(model_type: str) -> FamilySpec:
    """The `FamilySpec` of `model_type`, discovered on a tiny config of the architecture (cached)."""
    name = _canonical(model_type)
    return replace(discover(tiny_config(name)), model_type=name)


def _canonical(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type in CONFIG_MAPPING_NAMES:
        return model_type
    norm = model_type.lower().replace("-", "_")
    for name in CONFIG_MAPPING_NAMES:
        if name.replace("-", "_") == norm:
            return name
    raise UnknownFamilyError(
        f"transformers {_tf_version()} has no architecture {model_type!r}; `mmblocks blocks families` lists the "
        "causal-LM architectures it can load"
    )


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def list_families() -> list[str]:
    """Every causal-LM `model_type` registered in `transformers` (whether its layers run is checked per family by
    `mmblocks blocks families --check`)."""
    return iter_causal_lm_types()


# --------------------------------------------------------------------------------------------- tiny configs
_SIZES: dict[str, int] = dict(
    hidden_size=64,
    n_embd=64,
    d_model=64,
    num_attention_heads=4,
    n_head=4,
    num_heads=4,
    n_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    n_positions=256,
    intermediate_size=128,
    ffn_hidden_size=128,
    n_inner=128,
    ffn_dim=128,
    word_embed_proj_dim=64,
    decoder_ffn_dim=128,
    decoder_attention_heads=4,
    decoder_layers=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    attention_hidden_size=64,
    embedding_dim=64,
    moe_topk=2,
    n_shared_experts=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    n_group=1,
    topk_group=1,
)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _shrink(config: PretrainedConfig, n_layers: int) -> None:
    values = config.to_dict()
    for key, value in _SIZES.items():
        if key in values and isinstance(values[key], int) and not isinstance(values[key], bool):
            setattr(config, key, value)
    if "qk_rope_head_dim" in values:  # multi-head latent attention: the rotary width is the rope part
        config.head_dim = _SIZES["qk_rope_head_dim"]
        if "num_key_value_heads" in values:
            config.num_key_value_heads = _SIZES["num_attention_heads"]
    else:
        for key in (
            "head_dim",
            "num_key_value_heads",
            "intermediate_size",
            "num_attention_heads",
            "num_experts_per_tok",
        ):
            if key in values and values[key] is None:  # "derive from the others": give the small value itself
                setattr(config, key, _SIZES[key])
    if isinstance(values.get("rotary_dim"), int):  # GPT-J / CodeGen rotate part of each head
        config.rotary_dim = 8
    if isinstance(values.get("emb_dim"), int):
        config.emb_dim = 64
    old = next((values[k] for k in _LAYER_KEYS if isinstance(values.get(k), int)), None)
    for key in _LAYER_KEYS:
        if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
            setattr(config, key, n_layers)
    for key, value in values.items():  # per-layer lists (layer_types, mlp_layer_types, heads per layer ...)
        if isinstance(value, list) and value and old is not None and len(value) == old:
            kinds = list(dict.fromkeys(v for v in value if isinstance(v, (str, int, float))))
            if key.endswith("types") and len(kinds) == len(set(value)):
                value = [kinds[i % len(kinds)] for i in range(n_layers)]  # keep every kind, cycled
            setattr(config, key, list(value[:n_layers]))
    per_layer = values.get("per_layer_config")
    if isinstance(per_layer, dict):  # Gemma 4: overrides keyed by layer index; keep those of the layers left
        config.per_layer_config = {k: v for k, v in per_layer.items() if str(k).isdigit() and int(k) < n_layers}
    if isinstance(values.get("num_kv_shared_layers"), int):  # Gemma 3n: the last layers reuse earlier KV
        config.num_kv_shared_layers = 0
    for key in ("vocab_size_per_layer_input", "hidden_size_per_layer_input", "laurel_rank"):
        if isinstance(values.get(key), int) and values[key] > 0:
            setattr(config, key, {"vocab_size_per_layer_input": 128}.get(key, 16))
    if isinstance(values.get("attn_layer_period"), int):  # Jamba: attention every `period` layers from `offset`
        config.attn_layer_period, config.attn_layer_offset = 2, 1
    if "attn_layer_indices" in values:  # Bamba / GraniteMoeHybrid: attention at these indices
        config.attn_layer_indices = [1, 2]
    vocab = getattr(config, "vocab_size", None)
    for key, value in values.items():
        if key.endswith("_token_id") and isinstance(value, int) and isinstance(vocab, int) and value >= vocab:
            setattr(config, key, min(3, vocab - 1))
    for key in values:
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig) and sub is not config:
            _shrink(sub, n_layers)


def tiny_config(model_type: str, n_layers: int = 4, **overrides: Any) -> PretrainedConfig:
    """A small config of `model_type` (width 64, `n_layers` layers, 4 heads, 4 experts, vocabulary 128): the
    family's defaults with every size the config names shrunk, so its architecture builds in well under a second.
    Sub-configs (a multimodal model's text and vision configs) are shrunk the same way."""
    config = AutoConfig.for_model(_canonical(model_type))
    _shrink(config, n_layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def iter_causal_lm_types() -> list[str]:
    """Every `model_type` that `transformers` registers a causal-LM class for, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
