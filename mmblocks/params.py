"""The trainable / frozen parameter table printed by `LLMBlocks` and `MMEncoder`."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["parameter_table"]


def parameter_table(groups: Iterable[tuple[str, nn.Module]]) -> str:
    """A text table of trainable and frozen parameter counts per named group, with a total row."""
    rows = []
    for name, module in groups:
        params = list(module.parameters())
        rows.append(
            (
                name,
                sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params if not p.requires_grad),
            )
        )
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{width}}  {'trainable':>12}  {'frozen':>12}", "-" * (width + 28)]
    lines += [f"{name:<{width}}  {t:>12,}  {f:>12,}" for name, t, f in rows]
    return "\n".join(lines)
