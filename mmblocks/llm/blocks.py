"""`LLMBlocks`: a stack of an LLM's own `transformers` layer instances, run on any token sequence."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenizers_mm import Tokens

from ..layers.masks import (
    ATTENTION_MODES,
    CAUSAL_IMPLS,
    check_backend,
    layer_attention_kwargs,
    uses_post_softmax_mult,
)
from ..layers.rope import axial_rope
from ..layers.soft_mask import SoftMaskSchedule
from ..params import parameter_table
from .attention import POST_SOFTMAX_MULT_IMPL, set_causal_flags
from .families import FamilySpec, position_args

__all__ = ["AXIAL_ROPES", "FINAL_NORMS", "ROPE_MODES", "FinalNorm", "LLMBlocks", "RopeMode", "call_layer"]

RopeMode = Literal["none", "native", "2d", "3d"]
ROPE_MODES: tuple[str, ...] = get_args(RopeMode)
AXIAL_ROPES: dict[str, int] = {"2d": 2, "3d": 3}  # rope mode -> the width Tokens.pos must have
FinalNorm = Literal["none", "rms_unit", "llm"]
FINAL_NORMS: tuple[str, ...] = get_args(FinalNorm)


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

    Attention (`mmblocks.layers.masks`): ``bidirectional``, ``causal`` or ``soft`` (iLLaMA's mix
    ``r * ones + (1 - r) * tril``; ``r`` comes from the `soft_mask` schedule through `set_soft_mask_ratio`, called
    by `mmblocks.layers.soft_mask.advance_soft_masks`, and is kept in the persistent buffer ``soft_mask_ratio``).
    ``causal_impl`` picks ``pre_softmax`` (additive mask; every backend for causal, eager / SDPA / flex for soft)
    or ``post_softmax_mult`` (iLLaMA's multiplicative mask after the softmax; eager only).

    Rotary (`rope`): ``none`` (identity), ``native`` (the model's rotary over token order), ``2d`` / ``3d``
    (VisionLLaMA's axial rotary over `Tokens.pos` ``[B, N, 2 | 3]``, `mmblocks.layers.rope.axial_rope`, with base
    `rope_theta`, identity for special tokens and AS2DRoPE auto-scaling to `rope_train_grid` when set). Axial
    rotary needs a rotary family and `Tokens` input with positions of that width.

    Attributes:
        hidden_size: the model width ``D``.
        num_layers: how many layers run (expansion copies included).
        family: `config.model_type` of the source model.
        source: where the weights came from.
        layer_indices: the source-model index of each layer (``None`` for an expansion copy).
        aux_loss: the auxiliary loss of the last training forward: the divergence loss of `tune="interpolate"` and,
            for mixture-of-experts families, the routers' load-balancing loss (see `attach_router_loss`); 0 otherwise.
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
        causal_impl: str = "pre_softmax",
        soft_mask: Any = None,
        rope_theta: float = 10000.0,
        rope_train_grid: Sequence[int] | None = None,
    ):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
        if causal_impl not in CAUSAL_IMPLS:
            raise ValueError(f"causal_impl must be one of {CAUSAL_IMPLS}, got {causal_impl!r}")
        if rope in AXIAL_ROPES and rotary is None:
            raise ValueError(
                f"rope={rope!r} rotates queries and keys by given cos/sin, but {family.model_type}'s positions are "
                f"{family.positions} (not a rotary module the layers are given); use rope='none' or 'native'"
            )
        if rope_train_grid is not None and rope in AXIAL_ROPES and len(rope_train_grid) != AXIAL_ROPES[rope]:
            raise ValueError(f"rope_train_grid {tuple(rope_train_grid)} must have {AXIAL_ROPES[rope]} sizes for {rope}")
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
        self._position_args = position_args(family)
        self._takes_shared_kv = any(
            "shared_kv_states" in inspect.signature(layer.forward).parameters for layer in layers
        )
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
        self._router_logits: list[torch.Tensor] = []
        self._collect_router_logits = False
        self._router_loss_args: tuple = ()
        self._always_eval: list[nn.Module] = []
        self._pos_cache: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._rotary_dims: dict[str, int] = {}
        self.rope_theta = float(rope_theta)
        self.rope_train_grid = None if rope_train_grid is None else tuple(int(g) for g in rope_train_grid)
        self._backend = str(config._attn_implementation)
        self._causal_impl = causal_impl
        self._ratio_given = False
        self.soft_mask = _schedule(soft_mask)
        self._attention = attention
        self.attention = attention

    # ------------------------------------------------------------------ configuration
    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, mode: str) -> None:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
        self._configure(mode, self._causal_impl, self._backend)

    @property
    def causal_impl(self) -> str:
        """``pre_softmax`` (additive causal mask) or ``post_softmax_mult`` (iLLaMA: weights x mask, eager only)."""
        return self._causal_impl

    @causal_impl.setter
    def causal_impl(self, impl: str) -> None:
        if impl not in CAUSAL_IMPLS:
            raise ValueError(f"causal_impl must be one of {CAUSAL_IMPLS}, got {impl!r}")
        self._configure(self._attention, impl, self._backend)

    def _configure(self, mode: str, causal_impl: str, backend: str) -> None:
        """Check that `backend` runs the mode, then set the modules' causal flags and the configs' backend."""
        check_backend(backend, mode, causal_impl)
        self._attention, self._causal_impl, self._backend = mode, causal_impl, backend
        # SDPA and flash fall back on `module.is_causal` when the mask is None: keep it true to the mode.
        set_causal_flags(self.layers, mode == "causal" and causal_impl == "pre_softmax")
        if mode == "soft" and "soft_mask_ratio" not in self._buffers:
            start = self.soft_mask.r_start if self.soft_mask is not None else 1.0
            self._register_ratio(start)
        # post_softmax_mult runs the family's eager attention through a wrapper registered under its own name
        effective = POST_SOFTMAX_MULT_IMPL if uses_post_softmax_mult(mode, causal_impl) else backend
        for cfg in self._configs():
            cfg._attn_implementation = effective

    def set_soft_mask_ratio(self, ratio: float) -> None:
        """Set the soft-mask mix ratio ``r`` (1 = bidirectional, 0 = causal) used by ``attention="soft"``."""
        ratio = float(ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"the soft mask ratio must lie in [0, 1], got {ratio}")
        if "soft_mask_ratio" not in self._buffers:
            self._register_ratio(ratio)
        else:
            self.soft_mask_ratio.fill_(ratio)
        self._ratio_given = True

    def _register_ratio(self, ratio: float) -> None:
        device = next((p.device for p in self.layers.parameters()), torch.device("cpu"))
        device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer("soft_mask_ratio", torch.tensor(float(ratio), device=device), persistent=True)

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
        """The attention backend chosen (``eager``, ``sdpa``, ...). With ``post_softmax_mult`` the layers' configs
        name `mmblocks.llm.attention.POST_SOFTMAX_MULT_IMPL`, a wrapper around the family's eager attention."""
        return self._backend

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
        self._configure(self._attention, self._causal_impl, attn_implementation)

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
    def _rotary_dim(self, layer_type: str, device: torch.device) -> int:
        """The width the family's rotary rotates (``head_dim``, or less for partial rotary)."""
        dim = self._rotary_dims.get(layer_type)
        if dim is None:
            probe = torch.empty(1, 1, self.hidden_size, device=device)
            position_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
            with torch.no_grad():
                extra = (layer_type,) if self.rotary_takes_layer_type else ()
                out = self.rotary(probe, position_ids, *extra)
            if not isinstance(out, tuple):
                raise ValueError(
                    f"rope={self.rope!r} needs a rotary given as (cos, sin); {self.family}'s rotary returns "
                    f"{type(out).__name__} (complex frequencies): use rope='none' or 'native'"
                )
            dim = self._rotary_dims[layer_type] = int(out[0].shape[-1])
        return dim

    def _axial_positions(
        self, tokens: Tokens | None, n: int, device: torch.device, dtype: torch.dtype, layer_type: str
    ):
        """``(cos, sin) [B, N, rotary_dim]`` of the axial rotary over `Tokens.pos` (``rope="2d" | "3d"``)."""
        width = AXIAL_ROPES[self.rope]
        pos = tokens.pos if tokens is not None else None
        if pos is None or pos.shape[-1] != width:
            got = "a plain tensor" if tokens is None else f"Tokens with pos {None if pos is None else tuple(pos.shape)}"
            raise ValueError(
                f"rope={self.rope!r} rotates by token coordinates: it needs Tokens with pos [B, N, {width}], got {got}"
            )
        return axial_rope(
            pos.to(device),
            self._rotary_dim(layer_type, device),
            theta=self.rope_theta,
            num_prefix=tokens.num_prefix,
            num_suffix=tokens.num_suffix,
            grid=tokens.grid if self.rope_train_grid is not None else None,
            train_grid=self.rope_train_grid,
            dtype=dtype,
        )

    def rotates(self, layer_type: str) -> bool:
        """False for layer types the family runs without rotary (NoPE layers: their rope parameters are None)."""
        kinds = getattr(self.rotary, "rope_type", None)
        return self.rotary is not None and not (isinstance(kinds, dict) and layer_type not in kinds)

    def _positions(self, n: int, device: torch.device, dtype: torch.dtype, layer_type: str):
        """``(position_ids [1, N], rotary)`` for a layer type, cached per length, device and dtype. ``rotary`` is
        what the family's rotary module returns: ``(cos, sin)``, or one complex ``freqs_cis`` tensor (Llama 4);
        ``None`` for a layer type without rotary."""
        key = (n, device, dtype, layer_type, self.rope)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        position_ids = torch.arange(n, device=device).unsqueeze(0)
        probe = torch.empty(1, n, self.hidden_size, device=device, dtype=dtype)
        rot: Any = None
        if self.rotates(layer_type):
            with torch.no_grad():
                extra = (layer_type,) if self.rotary_takes_layer_type else ()
                rot = self.rotary(probe, position_ids, *extra)
        if self.rope == "none" and rot is not None:  # identity rotation: q*1 + rotate(q)*0 = q; complex: q*(1+0j)
            rot = (
                tuple(_identity_rotation(t, i) for i, t in enumerate(rot))
                if isinstance(rot, tuple)
                else (_identity_rotation(rot, 0))
            )
        if len(self._pos_cache) > 16:
            self._pos_cache.clear()
        self._pos_cache[key] = (position_ids, rot)
        return self._pos_cache[key]

    def layer_kwargs(
        self,
        batch_size: int,
        num_tokens: int,
        padding_mask: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
        tokens: Tokens | None = None,
    ) -> dict[str, dict[str, Any]]:
        """The keyword arguments each layer type is called with: an explicit mask (or the module's
        `is_causal` flag, see `attention.py`; plus the mask weights for ``post_softmax_mult``) and, for rotary
        families, `position_embeddings` (axial rotary over ``tokens.pos`` for ``rope="2d" | "3d"``)."""
        ratio = self._buffers.get("soft_mask_ratio") if self.attention == "soft" else None
        # Gemma 4 layers read and write the keys / values they share through one dict per forward
        shared_kv: dict[str, Any] | None = {} if self._takes_shared_kv else None
        out: dict[str, dict[str, Any]] = {}
        for layer_type in dict.fromkeys(self.layer_types):
            window = self.config.sliding_window if layer_type == "sliding_attention" else None
            kwargs: dict[str, Any] = layer_attention_kwargs(
                self._backend,
                self.attention,
                self.causal_impl,
                batch_size,
                num_tokens,
                padding_mask,
                dtype,
                device,
                sliding_window=window,
                ratio=ratio,
                # layer types beyond full / sliding (DeepSeek's indexed attention) read the mask themselves
                explicit=layer_type not in ("full_attention", "sliding_attention"),
            )
            if self.rotary is not None:
                position_ids, cos_sin = self._positions(num_tokens, device, dtype, layer_type)
                if self.rope in AXIAL_ROPES and cos_sin is not None:
                    cos_sin = self._axial_positions(tokens, num_tokens, device, dtype, layer_type)
                kwargs["position_embeddings"] = cos_sin
                kwargs["position_ids"] = position_ids
            elif self.spec.positions == "inside":  # the layer rotates by position_ids: all zero is no rotation
                ids = (
                    torch.arange(num_tokens, device=device)
                    if self.rope == "native"
                    else torch.zeros(num_tokens, dtype=torch.long, device=device)
                )
                kwargs["position_ids"] = ids.unsqueeze(0).expand(batch_size, -1)
            if self._position_args is not None:
                kwargs.update(self._position_args(self, batch_size, num_tokens, padding_mask, device, dtype))
            if shared_kv is not None:
                kwargs["shared_kv_states"] = shared_kv
            mask = kwargs.get("attention_mask")
            if self.spec.mask == "masked_bool" and isinstance(mask, torch.Tensor) and mask.is_floating_point():
                kwargs["attention_mask"] = mask != 0
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
        if hidden.shape[0] == 0 or hidden.shape[1] == 0:
            raise ValueError(
                f"LLMBlocks got an empty batch {tuple(hidden.shape)}: expected [B, N, D] with B >= 1 samples and "
                "N >= 1 tokens"
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
        if self.attention == "soft" and self.soft_mask is None and not self._ratio_given:
            warnings.warn(
                "LLMBlocks: attention='soft' without a soft_mask schedule and no set_soft_mask_ratio call: the mix "
                f"ratio stays at r={float(self.soft_mask_ratio):g}",
                stacklevel=2,
            )
            self._ratio_given = True  # warn once
        per_type = self.layer_kwargs(b, n, mask, hidden.device, compute_dtype, tokens=tokens)
        keep = mask[..., None] if mask is not None else None
        aux: torch.Tensor | float = 0.0
        # routers' logits are kept only while the block itself trains (a frozen router's balance is not ours to
        # change); decided once per forward, not per router call
        self._collect_router_logits = bool(self._router_loss_args) and (
            self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.layers.parameters())
        )
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
        if self._router_logits:
            aux = aux + self._router_loss(mask)
        hidden = self.final_norm(hidden).to(in_dtype)
        self.aux_loss = aux
        return tokens.with_x(hidden) if tokens is not None else hidden

    # ------------------------------------------------------------------ mixture-of-experts router loss
    def attach_router_loss(self, model_class: type, config: Any) -> bool:
        """Record the routers' logits (the modules the model class records as ``router_logits``) so that, while
        the block trains, `aux_loss` carries the family's own load-balancing loss (``load_balancing_loss_func`` of
        its modeling module) times ``config.router_aux_loss_coef``, as its causal LM adds it. True if attached."""
        import sys

        recorder = (getattr(model_class, "_can_record_outputs", None) or {}).get("router_logits")
        loss_fn = getattr(sys.modules.get(model_class.__module__), "load_balancing_loss_func", None)
        coef = getattr(config, "router_aux_loss_coef", None)
        if recorder is None or loss_fn is None or not coef:
            return False
        target = getattr(recorder, "target_class", recorder)
        index = getattr(recorder, "index", 0)
        names = ("num_local_experts", "num_experts", "n_routed_experts")
        experts = next((getattr(config, k) for k in names if hasattr(config, k)), None)
        top_k = getattr(config, "num_experts_per_tok", 2)
        self._router_loss_args = (loss_fn, experts, top_k, float(coef))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._collect_router_logits:
                self._router_logits.append(output[index] if isinstance(output, (tuple, list)) else output)

        found = 0
        for m in self.layers.modules():
            if isinstance(target, type) and isinstance(m, target):
                m.register_forward_hook(hook)
                found += 1
        return found > 0

    def _router_loss(self, mask: torch.Tensor | None) -> torch.Tensor:
        loss_fn, experts, top_k, coef = self._router_loss_args
        logits = tuple(self._router_logits)
        self._router_logits.clear()
        return coef * loss_fn(logits, experts, top_k, mask.long() if mask is not None else None)

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
        attention = self.attention
        if attention != "bidirectional":
            attention += f" ({self.causal_impl})"
        if self.attention == "soft":
            attention += f", soft_mask={self.soft_mask}"
        rope = self.rope
        if self.rope in AXIAL_ROPES:
            rope += f" (theta={self.rope_theta:g}, train_grid={self.rope_train_grid})"
        return (
            f"family={self.family}, source={self.source!r}, layers={self.layer_indices}, "
            f"attention={attention}, rope={rope}, final_norm={self.final_norm_kind}, tune={self.tune}, "
            f"attn_implementation={self.attn_implementation}"
        )


def _identity_rotation(t: torch.Tensor, index: int) -> torch.Tensor:
    """The no-rotation value of a rotary output: cos -> 1, sin -> 0, complex freqs_cis -> 1 + 0j."""
    if t.is_complex():
        return torch.ones_like(t)
    return torch.ones_like(t) if index == 0 else torch.zeros_like(t)


def _schedule(spec: Any) -> Any:
    """A `SoftMaskSchedule` from a schedule, a mapping or a number (None stays None)."""
    if spec is None:
        return None
    if isinstance(spec, (SoftMaskSchedule, Mapping, int, float)):
        return SoftMaskSchedule.create(spec)
    if hasattr(spec, "value"):
        return spec
    raise TypeError(f"soft_mask must be a SoftMaskSchedule, a mapping or a number, got {spec!r}")
