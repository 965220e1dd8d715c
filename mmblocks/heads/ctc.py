"""`CTCHead`: per-token logits over a character vocabulary, trained with CTC and decoded greedily — the LLM-free
ASR baseline arm (`torch.nn.CTCLoss`; blank id 0)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_mm import Tokens

from .registry import register_head

__all__ = ["CTCHead", "CTCOutput", "CharVocab", "ctc_loss", "greedy_decode"]


class CTCOutput(NamedTuple):
    """``log_probs [B, N, V]`` over the time tokens (special tokens removed) and their real ``lengths [B]``."""

    log_probs: torch.Tensor
    lengths: torch.Tensor


class CharVocab:
    """Characters <-> ids for CTC: id 0 is the blank, then the characters in the given order.

    Args:
        chars: the alphabet (e.g. ``"abcdefghijklmnopqrstuvwxyz '"``); text outside it is an error that names the
            character, never silently dropped.
    """

    def __init__(self, chars: str | Sequence[str]):
        chars = list(chars)
        if len(set(chars)) != len(chars):
            raise ValueError("CharVocab characters must be unique")
        self.chars = chars
        self.index = {c: i + 1 for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> CharVocab:
        """The sorted set of characters in `texts`."""
        return cls(sorted({c for t in texts for c in t}))

    def __len__(self) -> int:
        return len(self.chars) + 1  # with the blank

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise ValueError(f"characters {unknown} of {text!r} are not in the CTC vocabulary")
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 1] for i in ids if i > 0)


@register_head("ctc")
class CTCHead(nn.Module):
    """``Tokens [B, N, D] -> CTCOutput(log_probs [B, N', V], lengths [B])`` (V = vocabulary with blank 0).

    The tokens must be a time sequence (``Tokens.grid`` one-dimensional, e.g. `audio_frames`; a frequency x time
    patch grid is refused); special tokens (cls, registers) are dropped and the lengths come from `Tokens.mask`.
    `loss` is `torch.nn.CTCLoss` (mean over the batch of the per-sample loss divided by its target length,
    ``zero_infinity`` so that an input shorter than its target cannot give inf). `decode` is greedy: argmax per
    token, repeats collapsed, blanks removed.
    """

    def __init__(self, in_dim: int, vocab_size: int, dropout: float = 0.0):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size counts the blank and at least one symbol, got {vocab_size}")
        self.vocab_size = vocab_size
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, vocab_size)

    @staticmethod
    def lengths(tokens: Tokens | torch.Tensor) -> torch.Tensor:
        """Real tokens per sample ``[B]`` (CTC needs the padding at the end of each sequence)."""
        x = tokens.x if isinstance(tokens, Tokens) else tokens
        mask = tokens.mask if isinstance(tokens, Tokens) else None
        if mask is None:
            return torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        lengths = mask.long().sum(1)
        if not bool((mask == (torch.arange(x.shape[1], device=x.device) < lengths[:, None])).all()):
            raise ValueError("CTC needs each sample's real tokens first and its padding at the end (Tokens.mask)")
        return lengths

    def forward(self, tokens: Tokens | torch.Tensor) -> CTCOutput:
        if isinstance(tokens, Tokens):
            if tokens.grid is not None and len(tokens.grid) != 1:
                raise ValueError(
                    f"CTC reads a time sequence of tokens; these form a {tokens.grid} grid ({tokens.modality}): use a "
                    "tokenizer with one token per time step (e.g. audio_frames)"
                )
            end = tokens.x.shape[1] - tokens.num_suffix
            x = tokens.x[:, tokens.num_prefix : end]
            mask = tokens.mask[:, tokens.num_prefix : end] if tokens.mask is not None else None
            tokens = Tokens(x, mask=mask, modality=tokens.modality)
        log_probs = F.log_softmax(self.fc(self.drop(tokens.x if isinstance(tokens, Tokens) else tokens)).float(), -1)
        return CTCOutput(log_probs, self.lengths(tokens))

    def loss(self, log_probs: torch.Tensor, lengths: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
        """CTC loss of ``log_probs [B, N, V]`` (`lengths` real tokens each) against the target id sequences."""
        return ctc_loss(log_probs, lengths, targets)

    @staticmethod
    def decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Greedy CTC decoding (`greedy_decode`)."""
        return greedy_decode(log_probs, lengths)


def ctc_loss(log_probs: torch.Tensor, lengths: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """`torch.nn.functional.ctc_loss` (blank 0, mean over the batch of loss / target length, ``zero_infinity``) of
    ``log_probs [B, N, V]`` with `lengths` real tokens each, against the target id sequences."""
    if len(targets) != log_probs.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {log_probs.shape[0]}")
    if any(len(t) == 0 for t in targets):
        raise ValueError("an empty CTC target: every sample needs at least one symbol")
    flat = torch.tensor([i for t in targets for i in t], dtype=torch.long, device=log_probs.device)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long, device=log_probs.device)
    return F.ctc_loss(
        log_probs.transpose(0, 1), flat, lengths, target_lengths, blank=0, reduction="mean", zero_infinity=True
    )


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Per sample: argmax ids over its real tokens, repeats collapsed, blanks (0) removed."""
    best = log_probs.argmax(-1).tolist()
    out = []
    for ids, n in zip(best, lengths.tolist()):
        seq, prev = [], None
        for i in ids[:n]:
            if i != prev and i != 0:
                seq.append(i)
            prev = i
        out.append(seq)
    return out
