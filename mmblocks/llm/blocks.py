"""`LLMBlocks`: a stack of an LLM's own `transformers` layer instances, run on any token sequence."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenizers_mm import Tokens

from ..params import parameter_table
from .attention import ATTENTION_MODES, build_attention_mask, set_causal_flags
from .families import FamilySpec

__all__ = ["LLMBlocks", "ROPE_MODES", "FINAL_NORMS", "call_layer"]

ROPE_MODES: tuple[str, ...] = ("none", "native")
FINAL_NORMS: tuple[str, ...] = ("none", "rms_unit", "llm")


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a `transformers` layer and return its hidden states (older layers return tuples)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class LLMBlocks(nn.Module):
    """Transformer layers taken from a pretrained language model, applied in a given order.

    Holds the architecture's own `transformers` layer instances, so every attention backend that
    `transformers` ships (eager, SDPA, flash, flex) runs as is. Built by `mmblocks.llm.load_blocks`.

    Input / output: `Tokens` (``x`` ``[B, N, D]``, ``mask`` honoured as a padding mask; returned with the
    same metadata) or a ``[B, N, D]`` tensor (returns a tensor). ``D`` must equal `hidden_size`.

    Attributes:
        hidden_size: the model width ``D``.
        num_layers: how many layers run (expansion copies included).
        family: `config.model_type` of the source model.
        source: where the weights came from.
        layer_indices: the source-model index of each layer (``None`` for an expansion copy).
        aux_loss: the divergence loss of `tune="interpolate"` from the last forward (0 otherwise).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        *,
        config: Any,
        family: FamilySpec,
        layer_indices: Sequence[int | None],
        layer_types: Sequence[str],
        attention: str = "bidirectional",
        rope: str = "none",
        rotary: nn.Module | None = None,
        final_norm: nn.Module | None = None,
        final_norm_kind: str = "none",
        source: str = "",
        tune: str = "frozen",
    ):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
        if not (len(layers) == len(layer_indices) == len(layer_types)):
            raise ValueError("layers, layer_indices and layer_types must have the same length")
        self.layers = nn.ModuleList(layers)
        self.config = config
        self.spec = family
        self.family = family.model_type
        self.layer_indices = list(layer_indices)
        self.layer_types = list(layer_types)
        self.hidden_size = int(config.hidden_size)
        self.rope = rope
        self.rotary = rotary
        # Gemma 3 style rotaries take the layer type (each type has its own base frequency)
        self.rotary_takes_layer_type = (
            rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        )
        self.final_norm = final_norm if final_norm is not None else nn.Identity()
        self.final_norm_kind = final_norm_kind
        self.source = source
        self.tune = tune
        self.gradient_checkpointing = False
        self.supported_attn_implementations: list[str] | None = None
        self.aux_loss: torch.Tensor | float = 0.0
        self._always_eval: list[nn.Module] = []
        self._pos_cache: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.attention = attention

    # ------------------------------------------------------------------ configuration
    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, mode: str) -> None:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
        self._attention = mode
        # SDPA and flash fall back on `module.is_causal` when the mask is None: keep it true to the mode.
        set_causal_flags(self.layers, mode == "causal")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.layers.parameters():
            return p.dtype
        return torch.float32

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    def _configs(self) -> list[Any]:
        seen: dict[int, Any] = {id(self.config): self.config}
        for m in self.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                seen.setdefault(id(cfg), cfg)
        return list(seen.values())

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """Switch the attention backend (``eager``, ``sdpa``, ``flash_attention_2``, ``flex_attention``...)."""
        allowed = self.supported_attn_implementations
        if allowed is not None and attn_implementation not in allowed:
            raise ValueError(
                f"{self.family} does not support attn_implementation={attn_implementation!r}; it supports {allowed}"
            )
        for cfg in self._configs():
            cfg._attn_implementation = attn_implementation

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in backward (non-reentrant) to save activation memory when training."""
        self.gradient_checkpointing = enabled

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer should see (empty for `tune="frozen"`)."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> LLMBlocks:
        super().train(mode)
        for m in self._always_eval:  # frozen layers keep dropout off whatever the parent does
            m.eval()
        return self

    # ------------------------------------------------------------------ per-forward layer arguments
    def _positions(self, n: int, device: torch.device, dtype: torch.dtype, layer_type: str):
        """``(position_ids [1, N], (cos, sin))`` for a layer type, cached per length, device and dtype."""
        key = (n, device, dtype, layer_type, self.rope)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        position_ids = torch.arange(n, device=device).unsqueeze(0)
        probe = torch.empty(1, n, self.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            if self.rotary_takes_layer_type:
                cos, sin = self.rotary(probe, position_ids, layer_type)
            else:
                cos, sin = self.rotary(probe, position_ids)
        if self.rope == "none":  # identity rotation: q*1 + rotate(q)*0 = q
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        if len(self._pos_cache) > 16:
            self._pos_cache.clear()
        self._pos_cache[key] = (position_ids, (cos, sin))
        return self._pos_cache[key]

    def layer_kwargs(
        self,
        batch_size: int,
        num_tokens: int,
        padding_mask: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> dict[str, dict[str, Any]]:
        """The keyword arguments each layer type is called with: an explicit mask (or the module's
        `is_causal` flag, see `attention.py`) and, for rotary families, `position_embeddings`."""
        out: dict[str, dict[str, Any]] = {}
        for layer_type in dict.fromkeys(self.layer_types):
            window = self.config.sliding_window if layer_type == "sliding_attention" else None
            kwargs: dict[str, Any] = {
                "attention_mask": build_attention_mask(
                    self.attn_implementation,
                    self.attention,
                    batch_size,
                    num_tokens,
                    padding_mask,
                    dtype,
                    device,
                    sliding_window=window,
                )
            }
            if self.rotary is not None:
                position_ids, cos_sin = self._positions(num_tokens, device, dtype, layer_type)
                kwargs["position_embeddings"] = cos_sin
                kwargs["position_ids"] = position_ids
            out[layer_type] = kwargs
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tokens | torch.Tensor) -> Tokens | torch.Tensor:
        """Run the layers. ``x``: `Tokens` or ``[B, N, D]``; returns the same kind."""
        tokens = x if isinstance(x, Tokens) else None
        hidden = x.x if tokens is not None else x
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(
                f"LLMBlocks expects Tokens or a [B, N, D] tensor, got {getattr(hidden, 'shape', type(hidden))}"
            )
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"input width {hidden.shape[-1]} does not match the LLM hidden size {self.hidden_size} "
                f"({self.family}); put an adapter (e.g. adapters.create_adapter('linear', "
                f"{hidden.shape[-1]}, {self.hidden_size})) in front of the blocks"
            )
        mask = tokens.mask if tokens is not None else None
        if mask is not None and bool(mask.all()):
            mask = None
        in_dtype = hidden.dtype
        if not torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(self.dtype)
        compute_dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else hidden.dtype
        )
        b, n, _ = hidden.shape
        per_type = self.layer_kwargs(b, n, mask, hidden.device, compute_dtype)
        keep = mask[..., None] if mask is not None else None
        aux: torch.Tensor | float = 0.0
        for layer, layer_type in zip(self.layers, self.layer_types):
            kwargs = per_type[layer_type]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(call_layer, layer, hidden, kwargs, use_reentrant=False)
            else:
                hidden = call_layer(layer, hidden, kwargs)
            layer_aux = getattr(layer, "last_aux_loss", None)
            if layer_aux is not None:
                aux = aux + layer_aux
            if keep is not None:  # padded positions carry nothing; zero them so no NaN can leak through
                hidden = hidden.masked_fill(~keep, 0.0)
        hidden = self.final_norm(hidden).to(in_dtype)
        self.aux_loss = aux
        return tokens.with_x(hidden) if tokens is not None else hidden

    # ------------------------------------------------------------------ reporting
    def parameter_groups(self) -> Iterator[tuple[str, nn.Module]]:
        for i, (layer, idx) in enumerate(zip(self.layers, self.layer_indices)):
            name = f"layer {idx}" if idx is not None else "expansion copy"
            yield f"[{i}] {name} ({type(getattr(layer, 'layer', layer)).__name__})", layer
        if not isinstance(self.final_norm, nn.Identity):
            yield f"final norm ({self.final_norm_kind})", self.final_norm

    def parameter_table(self) -> str:
        """A table of trainable and frozen parameters per layer."""
        return parameter_table(self.parameter_groups())

    def extra_repr(self) -> str:
        return (
            f"family={self.family}, source={self.source!r}, layers={self.layer_indices}, "
            f"attention={self.attention}, rope={self.rope}, final_norm={self.final_norm_kind}, tune={self.tune}, "
            f"attn_implementation={self.attn_implementation}"
        )
