"""`frame_stack`: speech into an LLM by stacking k consecutive frames (SLAM-LLM's `EncoderProjectorConcat`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_mm import Tokens

from .base import Adapter
from .projections import _init_linear
from .registry import register_adapter

__all__ = ["FrameStackAdapter"]

REMAINDERS = ("drop", "pad")


@register_adapter("frame_stack")
class FrameStackAdapter(Adapter):
    """Concatenate ``k`` consecutive tokens into one, then ``Linear(k * in_dim, hidden) -> ReLU -> Linear(hidden,
    out_dim)`` (SLAM-LLM's ``EncoderProjectorConcat``; the frame stacking of Fathullah et al.'s speech LLaMA).

    Args:
        k: tokens per stacked token (SLAM-LLM's ``encoder_projector_ds_rate``, default 5).
        hidden_dim: hidden width (SLAM-LLM: 2048).
        remainder: ``drop`` (default, as SLAM-LLM) drops the last ``n % k`` tokens; ``pad`` zero-pads the last
            group to ``k`` tokens (``ceil(n / k)`` outputs).
        bias / init_std: the linears' biases and trunc-normal init std.

    Tokens: the prefix / suffix tokens (cls, registers) are dropped; the grid tokens are stacked in their row-major
    order (a multi-axis grid is read as one sequence). Output ``grid (n_out,)``; ``pos`` = the position of the first
    token of each group.

    Mask: a stacked token is real if its first source token is real (right-padded batches: the groups that start
    inside the sequence). Masked source tokens enter the stack as zeros, the same zeros as ``remainder="pad"``, so
    padding never changes a real stacked token: a sequence padded in a batch gives the outputs it gives alone (with
    ``remainder="pad"`` all of them; with ``drop`` the batch may keep a last, partly padded group that the
    sequence alone drops).

    Shape: `Tokens` ``[B, P + n + S, in_dim]`` -> `Tokens` ``[B, n // k, out_dim]`` (``ceil`` with ``pad``);
    a tensor ``[B, n, in_dim]`` (read as a 1D sequence) gives a tensor.
    """

    changes_token_count = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        k: int = 5,
        hidden_dim: int = 2048,
        remainder: str = "drop",
        bias: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"frame_stack k must be an int >= 1, got {k!r}")
        if remainder not in REMAINDERS:
            raise ValueError(f"frame_stack remainder must be one of {REMAINDERS}, got {remainder!r}")
        self.in_dim, self.out_dim, self.k, self.remainder = in_dim, out_dim, k, remainder
        self.net = nn.Sequential(
            nn.Linear(k * in_dim, hidden_dim, bias=bias), nn.ReLU(), nn.Linear(hidden_dim, out_dim, bias=bias)
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                _init_linear(m, init_std)

    def num_output_tokens(self, input_tokens: int | Tokens) -> int:
        """Stacked tokens for `Tokens`, or for an int count of tokens without special tokens."""
        n = input_tokens.num_grid_tokens if isinstance(input_tokens, Tokens) else input_tokens
        return n // self.k if self.remainder == "drop" else -(-n // self.k)

    def forward(self, tokens: Tokens | torch.Tensor) -> Tokens | torch.Tensor:
        is_tokens = isinstance(tokens, Tokens)
        self._check(tokens.x if is_tokens else tokens)
        if not is_tokens:
            tokens = Tokens(x=tokens)
        k, n = self.k, tokens.num_grid_tokens
        n_out = self.num_output_tokens(n)
        if n_out == 0:
            raise ValueError(
                f"frame_stack k={k}, remainder={self.remainder!r} needs at least {k} grid tokens, got {n} "
                f"(N={tokens.num_tokens}, num_prefix={tokens.num_prefix}, num_suffix={tokens.num_suffix})"
            )
        sl = slice(tokens.num_prefix, tokens.num_tokens - tokens.num_suffix)
        x, mask, pos = tokens.x[:, sl], tokens.mask, tokens.pos
        if mask is not None:
            mask = mask[:, sl]
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # not x * mask: padding may hold inf / nan
        used = n_out * k
        x = x[:, :used] if used <= n else F.pad(x, (0, 0, 0, used - n))
        b = x.shape[0]
        y = self.net(x.reshape(b, n_out, k * self.in_dim))
        if not is_tokens:
            return y
        return Tokens(
            x=y,
            mask=mask[:, :used:k] if mask is not None else None,
            pos=pos[:, sl][:, :used:k] if pos is not None else None,
            grid=(n_out,),
            modality=tokens.modality,
        )

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, k={self.k}, remainder={self.remainder!r}"
