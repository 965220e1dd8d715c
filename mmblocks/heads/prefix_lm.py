"""`PrefixLMHead`: modality tokens spliced into a causal LM's input embeddings (LLaVA, SLAM-LLM, Video-LLaMA).

The LM is any `transformers` causal LM (frozen, LoRA- or fully tuned; see `mmblocks.llm.load_lm`). Text is embedded
by ``lm.get_input_embeddings()`` (Gemma scales inside that module, so its weight is never indexed directly); the
modality tokens, mapped to the LM width by `adapter`, go either where each sample's single placeholder token stands
(``placeholder_id``, LLaVA) or before the text. Padding is removed before the splice and put back after it — on the
right for training, on the left for generation — so samples with different numbers of modality or text tokens batch
exactly, and ``position_ids`` count only real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_mm import Tokens

__all__ = ["IGNORE_INDEX", "PrefixLMHead", "PrefixLMOutput", "SplicedBatch"]

IGNORE_INDEX = -100


@dataclass
class SplicedBatch:
    """The LM's inputs after the splice: ``inputs_embeds [B, L, D]``, ``attention_mask [B, L]`` (1 = real),
    ``position_ids [B, L]`` (0.. over real tokens), ``labels [B, L]`` (-100 on modality tokens and padding, or None)
    and ``modality_span [B, 2]`` (start, end) of each sample's modality tokens (markers included)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    modality_span: torch.Tensor


@dataclass
class PrefixLMOutput:
    """``logits [B, L, V]`` over the spliced sequence, ``loss`` (shifted cross-entropy on the text labels, or None)
    and the `SplicedBatch` it was computed on."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    batch: SplicedBatch


class PrefixLMHead(nn.Module):
    """A causal LM that reads modality tokens among its text tokens.

    Args:
        lm: a `transformers` causal LM (peft-wrapped or not).
        adapter: maps the encoder's `Tokens` (``[B, N, D_enc]``) to the LM width; `None` when they already have it.
        placeholder_id: the token id each sample's text holds exactly once, replaced by its modality tokens
            (LLaVA's ``<image>``); `None` puts the modality tokens before the text.
        markers: trainable begin / end-of-modality embeddings around the modality tokens (initialised at the scale of
            the LM's token embeddings).
        max_length: the longest spliced sequence; a longer one loses text from its end, and one that would be cut
            inside its modality span is an error.
    """

    def __init__(
        self,
        lm: nn.Module,
        adapter: nn.Module | None = None,
        *,
        placeholder_id: int | None = None,
        markers: bool = True,
        max_length: int | None = None,
    ):
        super().__init__()
        self.lm = lm
        self.adapter = adapter
        self.placeholder_id = placeholder_id
        self.max_length = max_length
        embed = lm.get_input_embeddings()
        width = int(embed.embedding_dim if hasattr(embed, "embedding_dim") else embed.weight.shape[1])
        self.hidden_size = width
        if markers:
            with torch.no_grad():
                scale = float(embed.weight.float().std())
            g = torch.Generator().manual_seed(0)
            self.begin = nn.Parameter(torch.randn(width, generator=g) * scale)
            self.end = nn.Parameter(torch.randn(width, generator=g) * scale)
        else:
            self.begin = self.end = None

    def train(self, mode: bool = True) -> PrefixLMHead:
        """`nn.Module.train`, except that a LM with nothing to train stays in eval mode (no dropout in a frozen LM,
        which then behaves as at generation)."""
        super().train(mode)
        if not any(p.requires_grad for p in self.lm.parameters()):
            self.lm.eval()
        return self

    # ------------------------------------------------------------------ splice
    def _modality(self, tokens: Tokens | torch.Tensor | None, batch: int) -> list[torch.Tensor | None]:
        if tokens is None:
            return [None] * batch
        if self.adapter is not None:
            tokens = self.adapter(tokens)
        x = tokens.x if isinstance(tokens, Tokens) else tokens
        mask = tokens.mask if isinstance(tokens, Tokens) else None
        if x.dim() != 3 or x.shape[0] != batch or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"modality tokens must be [B={batch}, N, D={self.hidden_size}] (the LM width) after the adapter, got "
                f"{tuple(x.shape)}"
            )
        out = []
        for b in range(batch):
            m = x[b] if mask is None else x[b][mask[b]]
            if self.begin is not None:
                m = torch.cat([self.begin[None].to(m.dtype), m, self.end[None].to(m.dtype)])
            out.append(m)
        return out

    def splice(
        self,
        tokens: Tokens | torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> SplicedBatch:
        """Build the LM's inputs (see `SplicedBatch`). Text padding (``attention_mask`` 0) and modality tokens whose
        `Tokens.mask` is False are dropped; the result is padded on `padding_side`."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        batch = input_ids.shape[0]
        keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        ids_to_embed = input_ids
        if self.placeholder_id is not None:  # the placeholder may be no vocabulary id (LLaVA's -200): never embedded
            ids_to_embed = input_ids.masked_fill(input_ids == self.placeholder_id, 0)
        text = self.lm.get_input_embeddings()(ids_to_embed)
        modality = self._modality(tokens, batch)
        seqs, labs, spans = [], [], []
        for b in range(batch):
            ids, emb = input_ids[b][keep[b]], text[b][keep[b]]
            lab = labels[b][keep[b]] if labels is not None else None
            mod = modality[b]
            if mod is None:
                seq, span = emb, (0, 0)
            else:
                mod = mod.to(emb.dtype)
                if self.placeholder_id is None:
                    p, rest = 0, 0
                else:
                    where = (ids == self.placeholder_id).nonzero().flatten()
                    if len(where) != 1:
                        raise ValueError(
                            f"sample {b} holds the placeholder id {self.placeholder_id} {len(where)} times among its "
                            "real text tokens; each sample needs it exactly once"
                        )
                    p, rest = int(where[0]), 1
                seq = torch.cat([emb[:p], mod, emb[p + rest :]])
                span = (p, p + len(mod))
                if lab is not None:
                    fill = lab.new_full((len(mod),), IGNORE_INDEX)
                    lab = torch.cat([lab[:p], fill, lab[p + rest :]])
            if self.max_length is not None and len(seq) > self.max_length:
                if span[1] > self.max_length:
                    raise ValueError(
                        f"sample {b}: the spliced sequence has {len(seq)} tokens and its modality span ends at "
                        f"{span[1]}, past max_length={self.max_length}; it would be cut inside the modality tokens: "
                        "shorten the prompt, use fewer modality tokens, or raise max_length"
                    )
                seq = seq[: self.max_length]
                lab = lab[: self.max_length] if lab is not None else None
            if lab is not None and not bool((lab != IGNORE_INDEX).any()):
                raise ValueError(
                    f"sample {b} has no label to learn from (every label is -100 after the splice"
                    f"{' and the cut to max_length' if self.max_length else ''}): its loss would be silently 0"
                )
            seqs.append(seq)
            labs.append(lab)
            spans.append(span)
        return _pad(seqs, labs, spans, padding_side, text.dtype, text.device)

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        tokens: Tokens | torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> PrefixLMOutput:
        """Logits over the spliced sequence and, with `labels` (``[B, T]``, aligned with `input_ids`, -100 where no
        loss is wanted), the mean next-token cross-entropy over the text labels."""
        batch = self.splice(tokens, input_ids, attention_mask, labels, padding_side="right")
        out = self.lm(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        loss = None
        if batch.labels is not None:
            shift_logits = out.logits[:, :-1].float()
            shift_labels = batch.labels[:, 1:]
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return PrefixLMOutput(out.logits, loss, batch)

    @torch.no_grad()
    def generate(
        self,
        tokens: Tokens | torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Only the new token ids ``[B, T_new]``, decoded by the LM's own ``generate`` from the left-padded spliced
        embeddings (its KV cache; positions counted over real tokens from the attention mask)."""
        batch = self.splice(tokens, input_ids, attention_mask, padding_side="left")
        return self.lm.generate(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, **generate_kwargs
        )


def _pad(
    seqs: list[torch.Tensor],
    labs: list[torch.Tensor | None],
    spans: list[tuple[int, int]],
    side: str,
    dtype: torch.dtype,
    device: torch.device,
) -> SplicedBatch:
    length = max(len(s) for s in seqs)
    batch, width = len(seqs), seqs[0].shape[-1]
    embeds = torch.zeros(batch, length, width, dtype=dtype, device=device)
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=device) if labs[0] is not None else None
    span = torch.zeros(batch, 2, dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        n = len(s)
        start = 0 if side == "right" else length - n
        embeds[b, start : start + n] = s
        mask[b, start : start + n] = 1
        if labels is not None:
            labels[b, start : start + n] = labs[b]
        span[b] = torch.tensor(spans[b], device=device) + start
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return SplicedBatch(embeds, mask, position_ids, labels, span)
