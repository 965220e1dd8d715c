"""What `mmblocks.llm.discovery` finds out about an architecture (`FamilySpec`), and the few facts it cannot find
(`ENTRIES`, each with its reason).

A family is never a subclass: `LLMBlocks` runs the architecture's own `transformers` layer instances and only
needs to know how to reach and call them. Every discovered family is checked against the model's own forward by
`tests/test_llm_oracle.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MMBlocksError

__all__ = ["ENTRIES", "FamilyEntry", "FamilySpec", "UnknownFamilyError", "position_args"]


class UnknownFamilyError(MMBlocksError, ValueError):
    """The architecture is not in `transformers`, or its layers cannot be found in its module tree."""


@dataclass(frozen=True)
class FamilySpec:
    """How to reach and call the layers of one `transformers` architecture (built by `discovery.discover`).

    Attributes:
        model_type: `config.model_type`.
        decoder: path of the decoder (``model.get_decoder()``) in the built model (``model``, ``transformer``...).
        layers: path of the layer `nn.ModuleList` inside the decoder.
        final_norm: path of the final norm inside the decoder (`None`: the family has none).
        rotary: path of the rotary-embedding module inside the decoder (positions ``rotary`` only).
        positions: ``rotary`` (cos/sin passed to the layers), ``inside`` (the layer rotates by ``position_ids``),
            ``absolute`` (embeddings added outside the layers, nothing to do) or an entry's own (``alibi``).
        norm: ``rms`` or ``layer`` (informational).
        attn: the self-attention child of a layer (LoRA ``target="attention"``).
        mlp: the other children with parameters (LoRA ``target="mlp"``; MoE blocks included).
        residual_out: parameters (relative to a layer) that write into the residual stream; zeroing them makes a
            pre-norm layer the identity (LLaMA Pro block expansion, checked when it is applied).
        sliding_all: ``config.sliding_window`` applies to every layer (no ``layer_types``).
        eps: the final norm's epsilon (``final_norm="rms_unit"`` uses it).
        encoder: bidirectional encoder layers (no attention module is causal in its own model).
        layer_class, model_class: the classes found.
        moe: the layer holds a mixture of experts.
        needs: required layer arguments nobody supplies (the family cannot run until an entry supplies them).
        entry: the reason the family carries an entry (`None`: everything was discovered).
        layer_args: extra layer arguments an entry supplies.
        mask: the eager mask format the layers take: ``additive`` (0 / -inf, `transformers`' own) or
            ``masked_bool`` (True where a key is masked out, MPT).
    """

    model_type: str
    decoder: str = "model"
    layers: str = "layers"
    final_norm: str | None = "norm"
    rotary: str | None = "rotary_emb"
    positions: str = "rotary"
    norm: str = "rms"
    attn: str = "self_attn"
    mlp: tuple[str, ...] = ("mlp",)
    residual_out: tuple[str, ...] = ()
    sliding_all: bool = False
    eps: float = 1e-6
    encoder: bool = False
    layer_class: str = ""
    model_class: str = ""
    moe: bool = False
    needs: tuple[str, ...] = ()
    entry: str | None = None
    layer_args: tuple[str, ...] = ()
    mask: str = "additive"

    @property
    def default_attention(self) -> str:
        """How the layers attend inside their own model: encoders are bidirectional, decoders causal."""
        return "bidirectional" if self.encoder else "causal"

    @property
    def discovered(self) -> bool:
        return self.entry is None


@dataclass(frozen=True)
class FamilyEntry:
    """Facts about a family that its module tree does not show, and why."""

    reason: str
    positions: str | None = None
    layer_args: tuple[str, ...] = ()
    layers: str | None = None
    mask: str = "additive"


# ------------------------------------------------------------------------------------------------ ALiBi families
def _bloom_alibi(blocks: Any, batch: int, n: int, padding: torch.Tensor | None, device, dtype) -> dict[str, Any]:
    """Bloom adds ``slope_h * key_position`` to the scores (``[B * H, 1, N]``); with ``rope="none"`` it is zero."""
    heads = int(blocks.config.n_head)
    if blocks.rope == "none":
        return {"alibi": torch.zeros(batch * heads, 1, n, device=device, dtype=dtype)}
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = padding.long() if padding is not None else torch.ones(batch, n, dtype=torch.long, device=device)
    return {"alibi": build_alibi_tensor(mask.to(device), heads, dtype)}


def _mpt_alibi(blocks: Any, batch: int, n: int, padding: torch.Tensor | None, device, dtype) -> dict[str, Any]:
    """MPT adds its own ALiBi table (``[H, 1, max_seq_len]``, sliced to the keys); zero for ``rope="none"``."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    cfg = blocks.config
    table = build_mpt_alibi_tensor(cfg.n_heads, max(n, cfg.max_seq_len), cfg.attn_config.alibi_bias_max, device)
    if blocks.rope == "none":
        table = torch.zeros_like(table)
    return {"position_bias": table.to(dtype)}


def _roformer_sinusoidal(blocks: Any, batch: int, n: int, padding: torch.Tensor | None, device, dtype) -> dict:
    """RoFormer rotates queries and keys by a sinusoidal table (``[1, 1, N, head_dim]``: sines, then cosines) that
    its encoder builds; ``rope="none"`` gives sin 0 / cos 1, the identity rotation."""
    cfg = blocks.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    half = dim // 2 if dim % 2 == 0 else dim // 2 + 1
    if blocks.rope == "none":
        table = torch.cat([torch.zeros(n, half), torch.ones(n, dim - half)], dim=-1)
    else:  # the table of RoFormerSinusoidalPositionalEmbedding, computed in float64 as it is
        pos = torch.arange(n, dtype=torch.float64)[:, None]
        j = torch.arange(dim, dtype=torch.float64)
        angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
        table = torch.cat([torch.sin(angle[:, 0::2]), torch.cos(angle[:, 1::2])], dim=-1).float()
    return {"sinusoidal_pos": table[None, None].to(device=device, dtype=dtype)}


POSITION_ARGS: dict[str, Callable[..., dict[str, Any]]] = {
    "bloom": _bloom_alibi,
    "mpt": _mpt_alibi,
    "roformer": _roformer_sinusoidal,
}


def position_args(spec: FamilySpec) -> Callable[..., dict[str, Any]] | None:
    """The builder of an entry's extra per-forward layer arguments (ALiBi biases), if the family has one."""
    return POSITION_ARGS.get(spec.model_type) if spec.layer_args else None


ENTRIES: dict[str, FamilyEntry] = {
    "bloom": FamilyEntry(
        "ALiBi: the model builds the per-head bias from the padding mask and passes it to every layer as `alibi`",
        positions="alibi",
        layer_args=("alibi",),
    ),
    "roformer": FamilyEntry(
        "rotary from a sinusoidal table the encoder builds and passes to every layer as `sinusoidal_pos`",
        positions="sinusoidal",
        layer_args=("sinusoidal_pos",),
    ),
    "mpt": FamilyEntry(
        "ALiBi: the model passes its bias table to every layer as `position_bias`; its attention takes a boolean "
        "mask, True where masked out",
        positions="alibi",
        layer_args=("position_bias",),
        mask="masked_bool",
    ),
}
