"""`check_input`: what every tokenizer checks at its entry, so that an ordinary mistake gets an error that says what was
expected instead of one from deep inside a convolution (``Input type (double) and bias type (float) ...``).

- layout: the number of dimensions (the message shows the expected layout, e.g. ``[B, C, H, W]``);
- an empty batch (any dimension of size 0) is refused;
- dtype: any floating dtype is cast to the tokenizer's weights (float64 / float16 / bfloat16 input is fine); an
  integer tensor (uint8 images) is an error that says to convert and scale;
- values: NaN or infinite entries raise unless ``allow_nonfinite`` (the check is skipped while `torch.compile`
  traces; on a GPU it costs one device sync per forward).
"""

from __future__ import annotations

import torch

__all__ = ["check_input", "count_nonfinite"]


def count_nonfinite(x: torch.Tensor) -> int:
    """The number of NaN / infinite entries of `x` (0 for integer tensors)."""
    if not (x.is_floating_point() or x.is_complex()):
        return 0
    return int((~torch.isfinite(x)).sum())


def check_input(
    x: torch.Tensor,
    name: str,
    layout: str,
    *,
    ndim: int | tuple[int, ...],
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
    integer_hint: str = "convert it to float first",
) -> torch.Tensor:
    """`x` checked as the input of tokenizer `name` (expected `layout`, e.g. ``"images [B, C, H, W]"``), cast to
    `dtype` (the tokenizer's weights; None keeps it).

    Raises:
        TypeError: not a tensor, or not floating point (`integer_hint` says how to convert).
        ValueError: another number of dimensions than `ndim`, an empty batch, or non-finite values (unless
            `allow_nonfinite`).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a tensor of {layout}, got {type(x).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in dims:
        raise ValueError(f"{name} expects {layout}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} got an empty batch (shape {tuple(x.shape)}): expected {layout} with every size >= 1")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects floating-point {layout}, got {x.dtype}: {integer_hint}")
    if not allow_nonfinite and not torch.compiler.is_compiling():
        bad = count_nonfinite(x)
        if bad:
            raise ValueError(
                f"{name}: the input holds {bad} NaN or infinite value(s) of {x.numel()}; repair or drop those "
                f"samples (or build the tokenizer with allow_nonfinite=True to let them through)"
            )
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x
