"""`qformer`: BLIP-2's querying transformer (Q-Former) as a token-count-changing adapter.

``num_queries`` learned query tokens read the encoder tokens through cross-attention and come out as a fixed number
of tokens, whatever the input length: ``[B, N, in_dim] -> [B, num_queries, out_dim]``.

The layer math is exactly HF's `Blip2QFormerModel` (transformers 5.x), written with plain torch modules and
`F.scaled_dot_product_attention`:

* embeddings: ``h = Dropout(LayerNorm(cat(queries, text)))`` — the LayerNorm covers the query tokens (and the text
  embeddings when there is text); text embeddings are word + absolute position embeddings (HF's
  `Blip2TextEmbeddings`, no LayerNorm of their own);
* every layer, BERT-style post-LayerNorm residuals (``LN(x + Dropout(sublayer(x)))``):
  self-attention over all positions (queries and text), then, on layers ``i % cross_attention_freq == 0`` only,
  cross-attention from the query positions to the encoder tokens (keys/values ``Linear(in_dim, hidden)``), then the
  query FFN (HF's ``intermediate_query``/``output_query``) on query positions and the text FFN
  (``intermediate``/``output``) on text positions;
* attention scale ``head_dim ** -0.5``, dropout on the attention probabilities (training only);
* then ``Linear(hidden, out_dim)`` on the query positions when ``out_dim`` is given.

Differences in layout only (weights map one to one, see `QFormer.from_hf`): self-attention's query/key/value are one
fused ``Linear(hidden, 3 * hidden)`` and cross-attention's key/value one ``Linear(in_dim, 2 * hidden)``. Speed: the
encoder's key/value projection (``B * N`` rows) dominates; without attention dropout (eval, or ``attention_dropout=0``)
it runs without its bias pass (the key bias cancels in the softmax, the value bias folds into the output projection),
which is exact up to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_mm import Tokens

from .base import Adapter
from .registry import register_adapter

__all__ = ["QFormer", "QFormerLayer"]

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
    "swish": lambda: nn.SiLU(),
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"qformer activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


class _Attention(nn.Module):
    """Multi-head attention with a BERT post-LN residual: ``LN(x + Dropout(out(attn(x, kv))))``.

    Self-attention (``kv_dim=None``): fused ``qkv = Linear(hidden, 3 * hidden)`` over ``x [B, L, hidden]``.
    Cross-attention: ``q = Linear(hidden, hidden)`` over ``x``, fused ``kv = Linear(kv_dim, 2 * hidden)`` over the
    encoder tokens ``[B, N, kv_dim]``. ``mask``: ``[B, 1, 1, S]`` bool (True = attend) or None.
    """

    def __init__(
        self, hidden: int, heads: int, dropout: float, attn_dropout: float, eps: float, kv_dim: int | None = None
    ):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.is_cross = kv_dim is not None
        if self.is_cross:
            self.q = nn.Linear(hidden, hidden)
            self.kv = nn.Linear(kv_dim, 2 * hidden)
        else:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_dropout = attn_dropout
        self.out = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, length, hidden = x.shape
        h, d = self.heads, self.head_dim
        p = self.attn_dropout if self.training else 0.0
        out_bias = self.out.bias
        if self.is_cross:
            q = self.q(x).view(b, length, h, d).transpose(1, 2)
            if p == 0.0:
                # The [B, N, 2 * hidden] key/value projection of the encoder tokens dominates the cost; skip its bias
                # pass. Exact without attention dropout: the key bias adds q . b_k to every score of a query row
                # (softmax ignores it) and, the attention weights summing to 1, the value bias comes out as is and
                # folds into the output projection: out(a + b_v) = W_o a + (W_o b_v + b_o).
                kv = F.linear(kv, self.kv.weight)
                if self.kv.bias is not None:
                    out_bias = torch.addmv(out_bias, self.out.weight, self.kv.bias[hidden:])
            else:
                kv = self.kv(kv)
            k, v = kv.view(b, kv.shape[1], 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = self.qkv(x).view(b, length, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        a = a.transpose(1, 2).reshape(b, length, hidden)
        return self.norm(x + self.drop(F.linear(a, self.out.weight, out_bias)))


class _FeedForward(nn.Module):
    """BERT's intermediate + output: ``LN(x + Dropout(fc2(act(fc1(x)))))``, ``[B, L, hidden] -> [B, L, hidden]``."""

    def __init__(self, hidden: int, intermediate: int, activation: str, dropout: float, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.act = _activation(activation)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.fc2(self.act(self.fc1(x)))))


class _TextEmbeddings(nn.Module):
    """HF's `Blip2TextEmbeddings`: ``word(ids) + position(position_ids)``, ``[B, T] -> [B, T, hidden]``.

    Positions count from 0 at the first text token (the queries take none); no LayerNorm here (the Q-Former's input
    LayerNorm covers queries and text together).
    """

    def __init__(self, vocab_size: int, max_positions: int, hidden: int, pad_token_id: int | None):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden, padding_idx=pad_token_id)
        self.position = nn.Embedding(max_positions, hidden)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be integer [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if position_ids is None:
            if t > self.position.num_embeddings:
                raise ValueError(f"{t} text tokens exceed the {self.position.num_embeddings} text positions")
            position_ids = torch.arange(t, device=input_ids.device)[None]
        return self.word(input_ids) + self.position(position_ids)


class QFormerLayer(nn.Module):
    """One Q-Former layer on ``h [B, Q + T, hidden]`` (the first ``num_queries`` positions are the queries).

    self-attention (all positions) -> cross-attention (query positions, if this layer has it) -> query FFN on the
    query positions, text FFN on the text positions.
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        intermediate: int,
        encoder_dim: int,
        has_cross_attention: bool,
        has_text_ffn: bool,
        activation: str,
        dropout: float,
        attn_dropout: float,
        eps: float,
    ):
        super().__init__()
        self.self_attn = _Attention(hidden, heads, dropout, attn_dropout, eps)
        self.cross_attn = (
            _Attention(hidden, heads, dropout, attn_dropout, eps, kv_dim=encoder_dim) if has_cross_attention else None
        )
        self.ffn_query = _FeedForward(hidden, intermediate, activation, dropout, eps)
        self.ffn_text = _FeedForward(hidden, intermediate, activation, dropout, eps) if has_text_ffn else None

    def forward(
        self,
        h: torch.Tensor,
        num_queries: int,
        encoder: torch.Tensor,
        encoder_mask: torch.Tensor | None = None,
        self_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.self_attn(h, mask=self_mask)
        has_text = h.shape[1] > num_queries
        q = h[:, :num_queries] if has_text else h
        if self.cross_attn is not None:
            q = self.cross_attn(q, encoder, encoder_mask)
        q = self.ffn_query(q)
        if not has_text:
            return q
        return torch.cat([q, self.ffn_text(h[:, num_queries:])], dim=1)


@register_adapter("qformer")
class QFormer(Adapter):
    """BLIP-2's Q-Former: ``num_queries`` learned queries cross-attend to the input tokens.

    Shape: ``[B, N, in_dim]`` (any N, padding marked by ``Tokens.mask``) ``-> [B, num_queries, out_dim]``.

    Args:
        in_dim: width of the encoder tokens (HF's ``encoder_hidden_size``; BLIP-2's EVA ViT-g: 1408).
        out_dim: width of the output tokens: ``Linear(hidden_size, out_dim)`` after the Q-Former (BLIP-2's
            ``language_projection``); ``None``: no projection, ``out_dim = hidden_size`` (HF's ``last_hidden_state``).
        num_queries: learned query tokens (BLIP-2: 32), initialised ``normal(0, init_std)`` as in LAVIS.
        hidden_size / num_heads / intermediate_size: Q-Former width, heads and FFN width (default ``4 * hidden``).
            Defaults 768 / 12 / 3072 are BERT-base's (BLIP-2's).
        num_layers: Q-Former depth. Default 6, half of BLIP-2's 12 (a cheaper adapter; pass 12 for BLIP-2's).
        cross_attention_freq: cross-attention on layers ``i % cross_attention_freq == 0`` (BLIP-2: 2 -> layers 0, 2,
            4, ...; 1: every layer).
        dropout / attention_dropout: hidden and attention-probability dropout (BERT / BLIP-2: 0.1 each).
        layer_norm_eps: LayerNorm epsilon (BERT: 1e-12).
        activation: FFN activation, HF's name (``gelu`` = exact erf GELU, ``gelu_new``, ``relu``, ``silu``).
        text_input: build the text FFN of every layer, needed to run text tokens alongside the queries (HF's
            ``use_qformer_text_input``; BLIP-2 stage 1 ITM/ITG). Implied by ``vocab_size``.
        vocab_size / max_text_positions / pad_token_id: build text embeddings (word + position, HF's
            `Blip2TextEmbeddings`) so that ``forward`` takes ``input_ids``; ``None`` (default): text only as
            ready-made ``text_embeds``.
        init_std: BERT init: linears and embeddings ``normal(0, init_std)``, zero biases, unit LayerNorms.

    ``forward(tokens, mask=None, *, text_embeds=None, input_ids=None, text_mask=None, text_position_ids=None)``:
    `Tokens` in -> `Tokens` out with ``x [B, num_queries, out_dim]``, ``mask=None`` (every query is real),
    ``pos [B, num_queries, 1]`` = query index (float32), ``grid=(num_queries,)``, ``num_prefix = num_suffix = 0``,
    the input's ``modality``. A ``[B, N, in_dim]`` tensor in -> the ``[B, num_queries, out_dim]`` tensor out (its
    padding mask, if any, as ``mask``). Padded encoder tokens (mask False) are never attended, so padding never
    changes the output; a sample with no real token at all attends to all of its tokens (as if unmasked) instead
    of producing NaNs. Text (``text_embeds [B, T, hidden_size]`` or ``input_ids [B, T]``, padding in
    ``text_mask [B, T]``) joins the self-attention of every layer, bidirectionally, as in HF's ITM path; only the
    query positions are returned (`forward_hidden` returns all positions). Encoder tokens are cast to the
    Q-Former's dtype (HF keeps its Q-Former in fp32 the same way).
    """

    changes_token_count = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        num_queries: int = 32,
        hidden_size: int = 768,
        num_layers: int = 6,
        num_heads: int = 12,
        intermediate_size: int | None = None,
        cross_attention_freq: int = 2,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        activation: str = "gelu",
        text_input: bool = False,
        vocab_size: int | None = None,
        max_text_positions: int = 512,
        pad_token_id: int | None = 0,
        init_std: float = 0.02,
    ):
        super().__init__()
        for name, value in [
            ("in_dim", in_dim),
            ("num_queries", num_queries),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("cross_attention_freq", cross_attention_freq),
        ]:
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"qformer {name} must be a positive int, got {value!r}")
        if out_dim is not None and not (isinstance(out_dim, int) and out_dim > 0):
            raise ValueError(f"qformer out_dim must be a positive int or None, got {out_dim!r}")
        if hidden_size % num_heads:
            raise ValueError(f"qformer hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        intermediate_size = intermediate_size or 4 * hidden_size
        self.in_dim = in_dim
        self.out_dim = out_dim if out_dim is not None else hidden_size
        self.num_queries, self.hidden_size, self.num_heads = num_queries, hidden_size, num_heads
        self.num_layers, self.cross_attention_freq = num_layers, cross_attention_freq
        self.text_input = text_input or vocab_size is not None

        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        self.text_embeddings = (
            _TextEmbeddings(vocab_size, max_text_positions, hidden_size, pad_token_id) if vocab_size else None
        )
        self.layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(
                hidden_size,
                num_heads,
                intermediate_size,
                in_dim,
                has_cross_attention=i % cross_attention_freq == 0,
                has_text_ffn=self.text_input,
                activation=activation,
                dropout=dropout,
                attn_dropout=attention_dropout,
                eps=layer_norm_eps,
            )
            for i in range(num_layers)
        )
        self.proj = nn.Linear(hidden_size, out_dim) if out_dim is not None else nn.Identity()
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        nn.init.normal_(self.query_tokens, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def num_output_tokens(self, input_tokens: int) -> int:
        """Always ``num_queries``, whatever the input length."""
        return self.num_queries

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_queries={self.num_queries}, "
            f"hidden_size={self.hidden_size}, num_layers={self.num_layers}, num_heads={self.num_heads}, "
            f"cross_attention_freq={self.cross_attention_freq}, text_input={self.text_input}"
        )

    # ------------------------------------------------------------------ input checks
    @staticmethod
    def _padding_mask(mask: torch.Tensor, b: int, n: int, what: str) -> torch.Tensor:
        """``[B, n]`` bool/integer (True/nonzero = real) -> ``[B, 1, 1, n]`` bool for SDPA (True = attend)."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"qformer {what} must be a [B, N] bool tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"qformer {what} must be [B, N] = [{b}, {n}], got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"qformer {what} must be bool (True = real token) or integer 0/1, got {mask.dtype}")
            mask = mask != 0
        return mask[:, None, None, :]

    def _inputs(
        self, tokens: Tokens | torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(tokens, Tokens):
            if mask is not None:
                raise ValueError("qformer: pass the padding mask inside Tokens.mask, not as `mask`, for Tokens input")
            x, mask = tokens.x, tokens.mask
        elif isinstance(tokens, torch.Tensor):
            x = tokens
        else:
            raise TypeError(f"qformer expects Tokens or a [B, N, {self.in_dim}] tensor, got {type(tokens).__name__}")
        self._check(x)
        if x.shape[1] == 0:
            raise ValueError("qformer needs at least one input token, got N=0")
        if mask is None:
            return x, None
        m = self._padding_mask(mask, x.shape[0], x.shape[1], "encoder mask")
        # A sample without any real token would give NaN rows (softmax over nothing): let it attend to all tokens.
        return x, m | ~m.any(dim=-1, keepdim=True)

    # ------------------------------------------------------------------ forward
    def forward_hidden(
        self,
        tokens: Tokens | torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        text_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Q-Former's last hidden state ``[B, num_queries + T, hidden_size]`` (queries first, then text), before
        the output projection: HF's ``Blip2QFormerModel(...).last_hidden_state``."""
        x, enc_mask = self._inputs(tokens, mask)
        b = x.shape[0]
        dtype = self.layernorm.weight.dtype
        h = self.query_tokens.expand(b, -1, -1)
        if input_ids is not None:
            if text_embeds is not None:
                raise ValueError("qformer: pass either text_embeds or input_ids, not both")
            if self.text_embeddings is None:
                raise ValueError(
                    "qformer: input_ids need text embeddings (build with vocab_size=...) or pass text_embeds"
                )
            text_embeds = self.text_embeddings(input_ids, text_position_ids)
        if text_embeds is not None:
            if not self.text_input:
                raise ValueError("qformer: text input needs the text FFN; build with text_input=True")
            if text_embeds.dim() != 3 or text_embeds.shape[0] != b or text_embeds.shape[2] != self.hidden_size:
                raise ValueError(
                    f"qformer text_embeds must be [B, T, hidden_size] = [{b}, T, {self.hidden_size}], "
                    f"got {tuple(text_embeds.shape)}"
                )
            h = torch.cat([h, text_embeds.to(dtype)], dim=1)
        self_mask = None
        if text_mask is not None:
            if text_embeds is None:
                raise ValueError("qformer: text_mask given without text (text_embeds or input_ids)")
            t = text_embeds.shape[1]
            tm = self._padding_mask(text_mask, b, t, "text_mask")
            self_mask = torch.cat([tm.new_ones(b, 1, 1, self.num_queries), tm], dim=-1)
        h = self.dropout(self.layernorm(h))
        x = x.to(dtype)
        for layer in self.layers:
            h = layer(h, self.num_queries, x, enc_mask, self_mask)
        return h

    def forward(
        self,
        tokens: Tokens | torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        text_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_position_ids: torch.Tensor | None = None,
    ) -> Tokens | torch.Tensor:
        """``Tokens`` / ``[B, N, in_dim]`` in -> ``num_queries`` query tokens ``[B, num_queries, out_dim]`` out."""
        h = self.forward_hidden(
            tokens,
            mask,
            text_embeds=text_embeds,
            input_ids=input_ids,
            text_mask=text_mask,
            text_position_ids=text_position_ids,
        )
        y = self.proj(h[:, : self.num_queries] if h.shape[1] > self.num_queries else h)
        if not isinstance(tokens, Tokens):
            return y
        b, q = y.shape[:2]
        pos = torch.arange(q, device=y.device, dtype=torch.float32).view(1, q, 1).expand(b, q, 1)
        return Tokens(x=y, mask=None, pos=pos, grid=(q,), num_prefix=0, num_suffix=0, modality=tokens.modality)

    # ------------------------------------------------------------------ conversion from transformers
    @classmethod
    def from_hf(
        cls,
        qformer: nn.Module | Mapping[str, torch.Tensor],
        query_tokens: torch.Tensor,
        out_dim: int | None = None,
        *,
        config: Any = None,
        text_embeddings: nn.Module | Mapping[str, torch.Tensor] | None = None,
    ) -> QFormer:
        """Build a `QFormer` from a HF Q-Former, weights copied.

        Args:
            qformer: a `transformers.Blip2QFormerModel`, or its state dict (keys as ``Blip2QFormerModel.state_dict()``;
                a whole-model state dict whose Q-Former keys start with ``qformer.`` works too) with ``config``.
            query_tokens: the learned queries ``[1, Q, hidden]`` (or ``[Q, hidden]``), e.g.
                ``Blip2Model.query_tokens``.
            out_dim: add a fresh ``Linear(hidden, out_dim)``; ``None``: ours outputs HF's ``last_hidden_state``
                (query positions).
            config: a `Blip2QFormerConfig` (or a dict of its fields); required with a state dict, taken from the
                model otherwise.
            text_embeddings: HF's `Blip2TextEmbeddings` (``Blip2ForImageTextRetrieval.embeddings``) or its state dict,
                to take ``input_ids``.
        The copy has the dtype and device of the HF weights.
        """
        if isinstance(qformer, nn.Module):
            if config is None:
                config = getattr(qformer, "config", None)
            state = dict(qformer.state_dict())
        elif isinstance(qformer, Mapping):
            state = dict(qformer)
            if not any(k.startswith("layernorm.") for k in state) and any(k.startswith("qformer.") for k in state):
                state = {k[len("qformer.") :]: v for k, v in state.items() if k.startswith("qformer.")}
        else:
            raise TypeError(
                f"from_hf expects a transformers Blip2QFormerModel or its state dict, got {type(qformer).__name__}"
            )
        if config is None:
            raise ValueError("from_hf: a state dict needs its Blip2QFormerConfig (config=...)")
        if isinstance(config, Mapping):
            from transformers import Blip2QFormerConfig

            config = Blip2QFormerConfig(**config)
        if not isinstance(query_tokens, torch.Tensor):
            raise TypeError(f"from_hf: query_tokens must be a tensor [1, Q, hidden], got {type(query_tokens).__name__}")
        queries = query_tokens.detach()
        if queries.dim() == 2:
            queries = queries[None]
        hidden = config.hidden_size
        if queries.dim() != 3 or queries.shape[0] != 1 or queries.shape[2] != hidden:
            raise ValueError(f"from_hf: query_tokens must be [1, Q, {hidden}], got {tuple(query_tokens.shape)}")
        hidden_act = config.hidden_act
        if not isinstance(hidden_act, str):
            raise ValueError(f"from_hf: hidden_act must be an activation name, got {hidden_act!r}")

        text_state: dict[str, torch.Tensor] = {}
        if text_embeddings is not None:
            text_state = dict(
                text_embeddings.state_dict() if isinstance(text_embeddings, nn.Module) else text_embeddings
            )
        model = cls(
            in_dim=config.encoder_hidden_size,
            out_dim=out_dim,
            num_queries=queries.shape[1],
            hidden_size=hidden,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            cross_attention_freq=config.cross_attention_frequency,
            dropout=config.hidden_dropout_prob,
            attention_dropout=config.attention_probs_dropout_prob,
            layer_norm_eps=config.layer_norm_eps,
            activation=hidden_act,
            text_input=bool(getattr(config, "use_qformer_text_input", False)),
            vocab_size=config.vocab_size if text_embeddings is not None else None,
            max_text_positions=config.max_position_embeddings,
            pad_token_id=config.pad_token_id,
        )
        ours = _convert_hf_state(state, text_state, model, queries)
        ref = state.get("layernorm.weight")
        if ref is not None:
            model.to(device=ref.device, dtype=ref.dtype)
        missing, unexpected = model.load_state_dict(ours, strict=False)
        missing = [k for k in missing if not k.startswith("proj.")]
        if missing or unexpected:
            raise ValueError(f"from_hf: weights missing {missing}, unexpected {unexpected}")
        return model


def _convert_hf_state(
    state: dict[str, torch.Tensor], text_state: dict[str, torch.Tensor], model: QFormer, queries: torch.Tensor
) -> dict[str, torch.Tensor]:
    """HF `Blip2QFormerModel` (+ `Blip2TextEmbeddings`) state dict -> ours; every HF tensor must be used."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"from_hf: HF Q-Former weight {key!r} missing (is the config right?)")
        used.add(key)
        return state[key]

    def linear(ours: str, hf: list[str]) -> None:
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = torch.cat([take(f"{h}.{p}") for h in hf], dim=0)

    def norm(ours: str, hf: str) -> None:
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{hf}.{p}")

    out: dict[str, torch.Tensor] = {"query_tokens": queries}
    norm("layernorm", "layernorm")
    for i, layer in enumerate(model.layers):
        src, dst = f"encoder.layer.{i}", f"layers.{i}"
        a = f"{src}.attention"
        linear(f"{dst}.self_attn.qkv", [f"{a}.attention.query", f"{a}.attention.key", f"{a}.attention.value"])
        linear(f"{dst}.self_attn.out", [f"{a}.output.dense"])
        norm(f"{dst}.self_attn.norm", f"{a}.output.LayerNorm")
        if layer.cross_attn is not None:
            c = f"{src}.crossattention"
            linear(f"{dst}.cross_attn.q", [f"{c}.attention.query"])
            linear(f"{dst}.cross_attn.kv", [f"{c}.attention.key", f"{c}.attention.value"])
            linear(f"{dst}.cross_attn.out", [f"{c}.output.dense"])
            norm(f"{dst}.cross_attn.norm", f"{c}.output.LayerNorm")
        linear(f"{dst}.ffn_query.fc1", [f"{src}.intermediate_query.dense"])
        linear(f"{dst}.ffn_query.fc2", [f"{src}.output_query.dense"])
        norm(f"{dst}.ffn_query.norm", f"{src}.output_query.LayerNorm")
        if layer.ffn_text is not None:
            linear(f"{dst}.ffn_text.fc1", [f"{src}.intermediate.dense"])
            linear(f"{dst}.ffn_text.fc2", [f"{src}.output.dense"])
            norm(f"{dst}.ffn_text.norm", f"{src}.output.LayerNorm")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"from_hf: HF Q-Former weights not used (config mismatch?): {left[:8]}")
    if text_state:
        for ours, hf in [("word", "word_embeddings"), ("position", "position_embeddings")]:
            key = f"{hf}.weight"
            if key not in text_state:
                raise ValueError(f"from_hf: text embeddings weight {key!r} missing")
            out[f"text_embeddings.{ours}.weight"] = text_state[key]
    return out
