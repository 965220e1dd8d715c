"""`load_lm` / `load_tokenizer`: the whole causal LM and its tokenizer, from the same offline sources as `load_blocks`.

The prefix-LM heads (`mmblocks.heads.PrefixLMHead`) splice modality tokens into this model's input embeddings and
decode with its own `generate`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..layers.norms import open_norm_parameters
from .discovery import discover
from .sources import SourceError, _load_gguf_model, resolve_source

__all__ = ["LM_TUNE_MODES", "LMTuneMode", "lm_layers", "load_lm", "load_tokenizer", "set_lm_checkpointing"]

LMTuneMode = Literal["frozen", "norm", "lora", "full"]
LM_TUNE_MODES: tuple[str, ...] = get_args(LMTuneMode)
_LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target": "all-linear"}


def load_lm(
    source: str | os.PathLike,
    *,
    tune: LMTuneMode = "frozen",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    seed: int | None = None,
    **tune_kwargs: Any,
) -> PreTrainedModel:
    """The causal LM of `source` (a model folder, a ``.gguf`` file, an offline name such as ``smollm2-135m``, a repo
    in the local HF cache, or ``random:<family>`` with `config_overrides`), loaded by `transformers` itself.

    Args:
        tune: ``frozen`` (no parameter trains; eval mode), ``norm`` (only norm weights), ``lora`` (peft LoRA; options
            ``r``, ``alpha``, ``dropout``, ``target`` = ``all-linear`` or a list of module names; returns the
            peft-wrapped model) or ``full``.
        dtype: load the weights in this dtype (e.g. ``bfloat16`` for a large frozen LM); default as stored.
        attn_implementation: ``sdpa``, ``eager``, ...; default `transformers`' choice.
        seed: seed of the random initialisation of ``random:`` sources.
    """
    if tune not in LM_TUNE_MODES:
        raise ValueError(f"load_lm tune must be one of {LM_TUNE_MODES}, got {tune!r}")
    unknown = sorted(set(tune_kwargs) - (set(_LORA_DEFAULTS) if tune == "lora" else set()))
    if unknown:
        raise TypeError(f"load_lm(tune={tune!r}) got unknown option(s) {unknown}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        dtype = getattr(torch, dtype)
    resolved = resolve_source(source, config_overrides)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if resolved.kind == "random":
        ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with ctx:
            if seed is not None:
                torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(resolved.config, **kwargs)
        if dtype is not None:
            model.to(dtype)
    elif resolved.kind == "gguf":
        model = _load_gguf_model(resolved.path)
        if dtype is not None:
            model.to(dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    else:
        if resolved.path is None:
            raise SourceError(f"{source!r} resolved to no folder; load_lm needs a model folder")
        model = AutoModelForCausalLM.from_pretrained(
            str(resolved.path), local_files_only=True, dtype=dtype if dtype is not None else "auto", **kwargs
        )
    return _apply_lm_tuning(model, tune, **tune_kwargs)


def _apply_lm_tuning(model: PreTrainedModel, tune: str, **opts: Any) -> PreTrainedModel:
    for p in model.parameters():
        p.requires_grad_(False)
    if tune == "frozen":
        return model.eval()
    if tune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif tune == "norm":
        open_norm_parameters(model)
    elif tune == "lora":
        from peft import LoraConfig, get_peft_model

        o = {**_LORA_DEFAULTS, **opts}
        target = o["target"]
        config = LoraConfig(
            r=o["r"],
            lora_alpha=o["alpha"],
            lora_dropout=o["dropout"],
            target_modules=target,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model.train()


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer of `source`: from the model folder (or the folder a registered GGUF model was converted to),
    or from the ``.gguf`` file itself. ``random:`` sources have none."""
    from transformers import AutoTokenizer

    text = str(source)
    if text.startswith("random:"):
        raise SourceError(f"{text} is a randomly initialised LM: it has no tokenizer; give a model folder or a name")
    resolved = resolve_source(source)
    if resolved.kind == "gguf":
        path = resolved.path
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if resolved.path is None:
        raise SourceError(f"{source!r} resolved to no folder with a tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(resolved.path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise SourceError(f"{resolved.path} has no tokenizer files ({err})") from err


def lm_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (peft-wrapped or not), found as `load_blocks` finds them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = discover(base.config, base)
    return (
        base.get_submodule(spec.decoder).get_submodule(spec.layers) if spec.decoder else base.get_submodule(spec.layers)
    )


def _checkpointed_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def set_lm_checkpointing(model: nn.Module, enable: bool = True) -> int:
    """Recompute each decoder layer of `model` in backward (non-reentrant `torch.utils.checkpoint`) whenever
    gradients are on, in train *or eval* mode: `transformers`' own ``gradient_checkpointing_enable`` acts only in
    train mode, while a frozen LM runs in eval mode and would keep every layer's activations for the gradients
    that flow through it to the adapter. Returns the number of layers switched."""
    layers = lm_layers(model)
    for layer in layers:
        wrapped = layer.__dict__.get("forward")
        if enable and wrapped is None:
            layer.forward = functools.partial(_checkpointed_forward, layer.forward)
        elif not enable and wrapped is not None:
            del layer.forward
    return len(layers)
