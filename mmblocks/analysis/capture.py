"""Read what a trained encoder computes at named places, over a loader: the tokens that enter and leave the LLM
stage, the final features its head pools, and the inputs themselves."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokenizers_mm import Tokens

__all__ = ["Captured", "capture_encoder"]

# (name, module path, "in" | "out")
PLACES = (
    ("before", "llm_stage", "in"),  # the backbone's tokens at the insertion point
    ("llm_in", "llm_stage.adapter_in", "out"),  # those tokens in the LLM's width: what its blocks receive
    ("after", "backbone.norm", "in"),  # the residual stream where the paper's stage ends (after it, or no stage)
)  # and "final": the normed tokens the head pools (what forward_features returns)


@dataclasses.dataclass
class Captured:
    """Tokens per place, concatenated over batches (``x [M, N, D]`` on the CPU, float32), the pooled final features
    ``[M, d]``, the inputs ``[M, ...]`` and the labels ``[M]`` (when the batches carry them)."""

    tokens: dict[str, Tokens]
    pooled: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor | None


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, tuple | list) and value else value


def _cat(parts: list[Tokens]) -> Tokens:
    x = torch.cat([p.x for p in parts])
    masks = [p.mask if p.mask is not None else torch.ones(p.x.shape[:2], dtype=torch.bool) for p in parts]
    pos = torch.cat([p.pos for p in parts]) if all(p.pos is not None for p in parts) else None
    first = parts[0]
    return dataclasses.replace(first, x=x, mask=torch.cat(masks), pos=pos)


@torch.no_grad()
def capture_encoder(model: nn.Module, batches: Iterable[Any], max_samples: int = 256) -> Captured:
    """Run `model` (an `MMEncoder`, eval mode) on `batches` (loader `Batch`es) until `max_samples`, keeping the tokens
    at `PLACES` that exist in it and the final ones."""
    model.eval()
    device = next(model.parameters()).device
    got: dict[str, list[Tokens]] = {}
    handles = []
    for name, path, side in PLACES:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue

        def keep(value: Any, name: str = name) -> None:
            value = _first(value)
            if isinstance(value, Tokens):
                got.setdefault(name, []).append(value.with_x(value.x.detach().float().cpu()).to("cpu"))
            elif isinstance(value, torch.Tensor) and value.dim() == 3:
                got.setdefault(name, []).append(Tokens(x=value.detach().float().cpu()))

        if side == "in":
            handles.append(module.register_forward_pre_hook(lambda m, args, keep=keep: keep(args)))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
    pooled, inputs, labels, seen = [], [], [], 0
    try:
        for batch in batches:
            batch = batch.to(device)
            tokens = model.forward_features(batch.inputs, batch.mask, **(batch.extra or {}))
            got.setdefault("final", []).append(tokens.with_x(tokens.x.detach().float()).to("cpu"))
            head = getattr(model, "head", None)
            pool = getattr(head, "pool_tokens", None)
            pooled.append((pool(tokens) if pool is not None else tokens.x.mean(1)).float().cpu())
            inputs.append(batch.inputs.detach().float().cpu())
            if batch.label is not None:
                labels.append(batch.label.cpu())
            seen += batch.inputs.shape[0]
            if seen >= max_samples:
                break
    finally:
        for h in handles:
            h.remove()
    if not pooled:
        raise ValueError("capture_encoder: the loader gave no batch")
    tokens_out = {name: _cat(parts) for name, parts in got.items() if parts}
    final = tokens_out["final"]
    for name, t in tokens_out.items():  # a bare tensor (a norm's input) has the final tokens' layout
        if t.grid is None and t.x.shape[:2] == final.x.shape[:2]:
            tokens_out[name] = dataclasses.replace(final, x=t.x, mask=final.mask, pos=final.pos)
    n = min(seen, max_samples)
    tokens_out = {k: _slice(v, n) for k, v in tokens_out.items()}
    return Captured(
        tokens=tokens_out,
        pooled=torch.cat(pooled)[:n],
        inputs=torch.cat(inputs)[:n],
        labels=torch.cat(labels)[:n] if labels else None,
    )


def _slice(tokens: Tokens, n: int) -> Tokens:
    return dataclasses.replace(
        tokens,
        x=tokens.x[:n],
        mask=tokens.mask[:n] if tokens.mask is not None else None,
        pos=tokens.pos[:n] if tokens.pos is not None else None,
    )
