"""`load_blocks`: build `LLMBlocks` from any source, reading only the tensors of the requested layers."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..layers.masks import ATTENTION_MODES, AttentionMode, CausalImpl
from ..layers.norms import UnitRMSNorm, is_norm_module
from .blocks import FINAL_NORMS, ROPE_MODES, FinalNorm, LLMBlocks, RopeMode
from .discovery import build_meta_model, discover, is_attention_type
from .families import FamilySpec, UnknownFamilyError
from .sources import MissingWeightsError, ResolvedSource, TensorReader, resolve_source
from .tuning import TUNE_MODES, TuneMode, apply_tuning

__all__ = ["DTYPES", "DTypeName", "load_blocks", "resolve_layers"]

#: dtype names a config may give (`load_blocks` also takes a `torch.dtype`).
DTypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(DTypeName)


def resolve_layers(layers: int | Iterable[int] | range, num_hidden_layers: int) -> list[int]:
    """Normalise `layers` (an int, indices with negatives allowed, or a range) to non-negative indices."""
    if isinstance(layers, int):
        layers = [layers]
    items = list(layers)
    if not items:
        raise ValueError("layers is empty: give at least one layer index, e.g. layers=[-1]")
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layer indices must be ints, got {i!r}")
        j = i + num_hidden_layers if i < 0 else i
        if not 0 <= j < num_hidden_layers:
            raise IndexError(
                f"layer index {i} is out of range for a model with {num_hidden_layers} layers "
                f"(valid: {-num_hidden_layers}..{num_hidden_layers - 1})"
            )
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"layers {items} name the same layer twice; each layer can be loaded once")
    return out


def _layer_types(config: PretrainedConfig, spec: FamilySpec, indices: Sequence[int]) -> list[str]:
    declared = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    out = []
    for i in indices:
        if declared:
            t = declared[i]
        elif spec.sliding_all and window:
            t = "sliding_attention"
        else:
            t = "full_attention"
        if not is_attention_type(t):
            raise UnknownFamilyError(
                f"layer {i} of {spec.model_type} is a {t!r} layer; LLMBlocks runs softmax-attention layers (full, "
                f"sliding-window, indexed / sparse; the model's layer types: {sorted(set(declared or []))}): pick "
                "attention layers"
            )
        if t == "sliding_attention" and not window:
            t = "full_attention"
        out.append(t)
    return out


def _selected_keys(model: nn.Module, keys: Sequence[str], prefixes: tuple[str, ...], mapping: list) -> list[str]:
    """The checkpoint keys that `transformers`' own renaming (`rename_source_key`, with the model's conversion
    mapping and base-model prefix) sends into `prefixes` of `model`'s state dict."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    out = []
    for key in keys:
        renamed, _ = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed = key
        if renamed.startswith(prefixes):
            out.append(key)
    return out


def load_weights(model: nn.Module, reader: TensorReader, prefixes: Sequence[str], what: str) -> None:
    """Load the parameters under `prefixes` (module paths in `model`, built on meta) exactly as `from_pretrained`
    would: the checkpoint keys that rename into them are read (nothing else), then `transformers`' own
    `convert_and_load_state_dict_in_model` applies the model's conversion mapping (fused experts, renamed norms,
    split or merged projections) and sets them. Anything under `prefixes` left unset is an error."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    prefixes = tuple(p if p.endswith(".") else p + "." for p in prefixes)
    mapping = get_model_conversion_mapping(model)
    keys = _selected_keys(model, reader.keys(), prefixes, mapping)
    if not keys:
        raise MissingWeightsError(
            f"the checkpoint has no tensors for {what}: no key renames to {prefixes[0]}* under "
            f"{type(model).__name__}'s conversion mapping (checkpoint keys look like {reader.keys()[:2]}); is it a "
            f"{model.config.model_type} checkpoint?"
        )
    state = reader.read(keys)
    config = LoadStateDictConfig(weight_mapping=mapping)
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its loading report lists every key we did not ask for as missing
    hf_logging.disable_progress_bar()
    try:
        info, _ = convert_and_load_state_dict_in_model(model, state, config)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    if info.conversion_errors:
        raise MissingWeightsError(f"transformers could not convert the tensors of {what}: {info.conversion_errors}")
    if info.mismatched_keys:
        raise MissingWeightsError(f"tensors of {what} have the wrong shape: {sorted(info.mismatched_keys)[:3]}")
    missing = sorted(k for k in info.missing_keys if k.startswith(prefixes))
    if missing:
        raise MissingWeightsError(f"checkpoint is missing {len(missing)} tensor(s) of {what}, e.g. {missing[:3]}")


def _materialize_random(module: nn.Module, base: nn.Module) -> None:
    """Give meta parameters real storage and the family's own init (the random-init control), as `transformers`
    initialises a fresh model: each module's ``reset_parameters`` and the family's ``_init_weights``, children before
    parents (a parent's scaled init, e.g. GPT-2's ``c_proj`` at 0.02/sqrt(2 n_layer), must not be overwritten by its
    child's plain one). A parameter that neither sets (one only a constructor sets, e.g. xIELU's ``alpha_p``) is
    read from the same layer built on the CPU; one that cannot be is an error, never left as garbage."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:  # NaN: what no init writes is found below
                data = torch.full_like(p, float("nan"), device="cpu")
                sub._parameters[name] = nn.Parameter(data, requires_grad=p.requires_grad)
    for sub in reversed(list(module.modules())):
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
        elif is_norm_module(sub):
            with torch.no_grad():
                for p in sub.parameters(recurse=False):
                    p.fill_(0.0 if "Gemma" in type(sub).__name__ else 1.0)
        type(base)._init_weights(base, sub)
    _init_leftovers(module, base.config)


def _init_leftovers(module: nn.Module, config: Any) -> None:
    """Parameters no init wrote (still NaN) take the values of a layer built on the CPU by its own constructor,
    which is where they are set (the parent passes arguments such as ``dtype=config.dtype``)."""
    left = [n for n, p in module.named_parameters() if p.is_floating_point() and bool(torch.isnan(p).all())]
    if not left:
        return
    try:
        try:
            fresh = type(module)(config, layer_idx=getattr(module, "layer_idx", 0))
        except TypeError:
            fresh = type(module)(config)
    except Exception as err:
        raise ValueError(
            f"random init: neither reset_parameters nor the family's _init_weights sets {left[:3]} of "
            f"{type(module).__name__}, and the module cannot be rebuilt from its config to read them ({err})"
        ) from err
    own, theirs = dict(module.named_parameters()), dict(fresh.named_parameters())
    with torch.no_grad():
        for name in left:
            own[name].copy_(theirs[name].detach().to(own[name].dtype))


def load_blocks(
    source: str | os.PathLike,
    layers: int | Iterable[int] | range,
    *,
    attention: AttentionMode = "bidirectional",
    rope: RopeMode = "none",
    final_norm: FinalNorm = "rms_unit",
    tune: TuneMode = "frozen",
    dtype: DTypeName | torch.dtype | None = None,
    attn_implementation: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    seed: int | None = None,
    causal_impl: CausalImpl = "pre_softmax",
    soft_mask: Any = None,
    rope_theta: float = 10000.0,
    rope_train_grid: Sequence[int] | None = None,
    **tune_kwargs: Any,
) -> LLMBlocks:
    """Load transformer layers of a pretrained LLM as an `LLMBlocks` module.

    Args:
        source: a local HF model folder, a ``.gguf`` file, a registered offline name (``smollm2-135m``),
            a repo name in the local HF cache, or ``random:<family>`` (see `mmblocks.llm.sources`).
        layers: indices (negative allowed) or a range; applied in the given order.
        attention: ``bidirectional`` (the center paper), ``causal``, or ``soft`` (iLLaMA's soft mask: the mix
            ``r * bidirectional + (1 - r) * causal``, r from `soft_mask`, advanced by the trainer).
        rope: ``none`` (identity rotation, the center paper), ``native`` (the model's rotary over token
            order 0..N-1; families with absolute positions outside the layers (OPT, GPT-2, BERT) ignore it), or
            ``2d`` / ``3d`` (VisionLLaMA's axial rotary over ``Tokens.pos``, `mmblocks.layers.rope`).
        final_norm: ``none``, ``rms_unit`` (parameter-free RMS norm, the center paper) or ``llm``.
        tune: ``frozen``, ``norm``, ``lora``, ``full``, ``gated``, ``expand`` or ``interpolate``; or a control:
            ``random`` (the family's init, frozen), ``shuffled`` / ``random_matched`` (the pretrained tensors
            permuted / redrawn at their own mean and std, frozen: `scramble_weights`) or ``scratch`` (the family's
            init, trained); options in ``tune_kwargs`` (see `mmblocks.llm.tuning.TUNE_KWARGS`).
        dtype: cast the layers to this dtype (default: as stored).
        attn_implementation: ``sdpa`` (default), ``eager``, ``flash_attention_2``, ``flex_attention``...
        config_overrides: config fields for ``random:<family>`` sources.
        seed: seed of the random initialisation (``random:`` sources, ``tune="random"`` / ``"scratch"``) and of the
            ``shuffled`` / ``random_matched`` controls; None: `torch.initial_seed()` (the training seed). Either way
            the global generator is not advanced, so the rest of a model is initialised as in the ``frozen`` arm.
        causal_impl: ``pre_softmax`` (additive mask) or ``post_softmax_mult`` (iLLaMA's released code; eager only).
        soft_mask: the `SoftMaskSchedule` (or its dict) of ``attention="soft"``.
        rope_theta, rope_train_grid: base frequency and AS2DRoPE training grid of the axial rotary.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if rope not in ROPE_MODES:
        raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {final_norm!r}")
    if tune not in TUNE_MODES:
        raise ValueError(f"tune must be one of {TUNE_MODES}, got {tune!r}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        dtype = getattr(torch, dtype)

    resolved: ResolvedSource = resolve_source(source, config_overrides)
    # The architecture's own modules, built without memory: parameters on `meta`, buffers (rotary
    # frequencies) real. Only the requested layers are materialised below.
    model = build_meta_model(resolved.config)
    spec = discover(resolved.config, model)
    decoder = model.get_submodule(spec.decoder) if spec.decoder else model
    config = decoder.config
    if spec.needs:
        raise UnknownFamilyError(
            f"{spec.model_type}: its layers ({spec.layer_class}) need the argument(s) {list(spec.needs)}, which its "
            "own model computes and mmblocks does not; it needs an entry in mmblocks/llm/families.py"
        )
    supported = supported_attn_implementations(model)
    impl = check_attn_implementation(config, attn_implementation, supported)
    for cfg in {id(c): c for c in (model.config, config)}.values():
        cfg._attn_implementation = impl
    stack = decoder.get_submodule(spec.layers)
    indices = resolve_layers(layers, len(stack))
    layer_types = _layer_types(config, spec, indices)
    chosen = [stack[i] for i in indices]
    random_init = resolved.reader is None or tune in ("random", "scratch")

    base = decoder if spec.decoder else model
    root = f"{spec.decoder}." if spec.decoder else ""
    norm_module: nn.Module | None = None
    if final_norm == "llm":
        if spec.final_norm is None:
            raise ValueError(f"{spec.model_type} has no final norm; use final_norm='rms_unit' or 'none'")
        norm_module = decoder.get_submodule(spec.final_norm)
    if random_init:
        owner = model if isinstance(model, PreTrainedModel) else base
        # one seeded stream for all layers (each layer its own draw), forked so the global generator is not
        # advanced: the adapters around a random block start as those around the pretrained one of the same seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed() if seed is None else seed)
            for module in chosen + ([norm_module] if norm_module is not None else []):
                _materialize_random(module, owner)
    else:
        prefixes = [f"{root}{spec.layers}.{i}" for i in indices]
        if norm_module is not None:
            prefixes.append(f"{root}{spec.final_norm}")
        what = f"layer(s) {indices}" + (" and the final norm" if norm_module is not None else "")
        load_weights(model, resolved.reader, prefixes, what)
    if final_norm == "rms_unit":
        norm_module = UnitRMSNorm(eps=spec.eps)

    rotary = decoder.get_submodule(spec.rotary) if spec.rotary is not None else None

    blocks = LLMBlocks(
        chosen,
        config=config,
        family=spec,
        layer_indices=indices,
        layer_types=layer_types,
        attention=attention,
        rope=rope,
        rotary=rotary,
        final_norm=norm_module,
        final_norm_kind=final_norm,
        source=resolved.label,
        causal_impl=causal_impl,
        soft_mask=soft_mask,
        rope_theta=rope_theta,
        rope_train_grid=rope_train_grid,
    )
    blocks.supported_attn_implementations = supported
    if spec.moe:
        blocks.attach_router_loss(type(model), config)
    del model, decoder, base, stack
    if dtype is not None:
        blocks.layers.to(dtype)
        blocks.final_norm.to(dtype)
    apply_tuning(blocks, tune, seed=seed, **tune_kwargs)
    return blocks


def supported_attn_implementations(model: nn.Module | PretrainedConfig) -> list[str]:
    """The attention backends the architecture declares support for (its `_supports_*` flags)."""
    if isinstance(model, PretrainedConfig):
        from .discovery import _model_classes

        classes = _model_classes(model)
        cls = classes[-1] if classes else object
    else:
        cls = type(model)
    out = ["eager"]
    if getattr(cls, "_supports_sdpa", False):
        out.append("sdpa")
    if getattr(cls, "_supports_flash_attn", False):
        out += ["flash_attention_2", "flash_attention_3"]
    if getattr(cls, "_supports_flex_attn", False):
        out.append("flex_attention")
    return out


def check_attn_implementation(config: PretrainedConfig, requested: str | None, supported: list[str]) -> str:
    """`requested`, validated against what the architecture supports; `None` picks SDPA, else eager."""
    if requested is None:
        return "sdpa" if "sdpa" in supported else "eager"
    if requested not in supported:
        raise ValueError(
            f"{config.model_type} does not support attn_implementation={requested!r}; it supports {supported}"
        )
    if requested == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU")
    return requested
