"""The adapter interface: `Tokens` (or a ``[B, N, D]`` tensor) in, the same kind out, with declared widths."""

from __future__ import annotations

import torch
from torch import nn

from tokenizers_mm import Tokens

__all__ = ["Adapter"]


class Adapter(nn.Module):
    """Base class of every projection between token spaces.

    Subclasses set `in_dim`, `out_dim` and `changes_token_count`, implement `project(x [B, N, in_dim])`
    (token-count-preserving adapters) and may override `forward` when they change the token count.
    """

    in_dim: int
    out_dim: int
    changes_token_count: bool = False

    def project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def num_output_tokens(self, input_tokens: int) -> int:
        """How many tokens come out for `input_tokens` going in."""
        return input_tokens

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"{type(self).__name__} expects [B, N, {self.in_dim}] tokens, got {tuple(x.shape)}")

    def forward(self, tokens: Tokens | torch.Tensor) -> Tokens | torch.Tensor:
        x = tokens.x if isinstance(tokens, Tokens) else tokens
        self._check(x)
        y = self.project(x)
        return tokens.with_x(y) if isinstance(tokens, Tokens) else y

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"
