"""Which layer of an LLM to put in an encoder: every candidate layer measured on real modality tokens.

For each layer, on the tokens a trained encoder feeds its LLM stage (``adapter_in``'s output): ShortGPT's Block
Influence (``1 - cos(in, out)``), the update RMS (``||out - in|| / ||in||``), and linear CKA between the layer's
pooled output and the encoder's final pooled features. A layer whose update is larger than its input (update RMS > 1)
replaces the tokens rather than refining them; among the others, the ones whose output keeps most of what the
encoder's head reads (highest CKA) are tried first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenizers_mm import Tokens

from ..llm import load_blocks
from .block_similarity import block_influence, layer_outputs, linear_cka
from .figures import pyplot, save_figure

__all__ = ["plot_layer_scan", "rank_layers", "scan_layers"]


def _pool(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(1)
    m = mask[..., None].float()
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def scan_layers(
    source: str,
    tokens: Tokens,
    final: torch.Tensor,
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
    **wiring: Any,
) -> list[dict[str, float]]:
    """Measure each of `layers` (default: all) of `source` on `tokens` (``[M, N, D_llm]``, the LLM stage's input)
    against `final` (``[M, d]``, the encoder's pooled final features).

    ``wiring``: `load_blocks` options (attention, rope, final_norm) as in the run. Returns one row per layer:
    ``layer``, ``block_influence``, ``update_rms``, ``cka_final`` (the layer's pooled output vs `final`; for the
    layer the run was trained with this is high by construction, since `final` is computed from it),
    ``cka_input`` (the layer's pooled output vs its pooled input: how much of the encoder's information it keeps)
    and ``cka_stage_final`` (the stage's pooled input vs `final`, the same in every row, for reference).
    """
    first = load_blocks(source, [0], **wiring)
    n_layers = int(first.config.num_hidden_layers)
    indices = list(range(n_layers)) if layers is None else [i % n_layers for i in layers]
    x, mask = tokens.x.float(), tokens.mask
    pooled_in = _pool(x, mask)
    cka_stage_final = linear_cka(pooled_in, final)
    rows = []
    for index in indices:
        blocks = first if index == 0 else load_blocks(source, [index], **wiring)
        outs = []
        for start in range(0, x.shape[0], batch_size):
            part = _rows(tokens, start, start + batch_size)
            outs.append(layer_outputs(blocks, part.with_x(part.x.to(blocks.dtype))))
        y = torch.cat(outs)
        diff = (y - x)[mask] if mask is not None else (y - x).reshape(-1, x.shape[-1])
        inp = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
        rows.append(
            {
                "layer": index,
                "block_influence": block_influence(x, y, mask),
                "update_rms": float(diff.norm() / inp.norm().clamp_min(1e-12)),
                "cka_final": linear_cka(_pool(y, mask), final),
                "cka_input": linear_cka(_pool(y, mask), pooled_in),
                "cka_stage_final": cka_stage_final,
            }
        )
    return rows


def _rows(tokens: Tokens, start: int, stop: int) -> Tokens:
    return Tokens(
        x=tokens.x[start:stop],
        mask=tokens.mask[start:stop] if tokens.mask is not None else None,
        pos=tokens.pos[start:stop] if tokens.pos is not None else None,
        grid=tokens.grid,
        num_prefix=tokens.num_prefix,
        num_suffix=tokens.num_suffix,
        modality=tokens.modality,
    )


def rank_layers(rows: Sequence[dict[str, float]], top: int = 3) -> tuple[list[int], str]:
    """The layers to try first, and why: among the layers that refine rather than replace their input (update RMS
    <= 1), those that keep most of it (CKA with the input), highest first; when every layer replaces its input, the
    smallest updates first (and the input's scale is the thing to fix: ``model.adapter_in.init_rms``)."""
    refining = [r for r in rows if r["update_rms"] <= 1.0]
    if refining:
        chosen = sorted(refining, key=lambda r: -r["cka_input"])[:top]
        why = "update RMS <= 1, then the highest CKA with the stage's input"
    else:
        chosen = sorted(rows, key=lambda r: r["update_rms"])[:top]
        why = (
            "every layer's update is larger than its input on these tokens, so the smallest updates; the input is "
            "far below the scale the LLM was trained on (model.adapter_in.init_rms: text)"
        )
    return [int(r["layer"]) for r in chosen], why


def plot_layer_scan(
    rows: Sequence[dict[str, float]], path: str | Path, used: Sequence[int] = (), title: str = ""
) -> Path:
    """Block Influence, update RMS (log) and CKA per layer; the layers the run used are marked."""
    plt = pyplot()

    layers = [r["layer"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in (
        (axes[0], "block_influence", "Block Influence 1 - cos(in, out)"),
        (axes[1], "update_rms", "update RMS ||out - in|| / ||in||"),
        (axes[2], "cka_input", "linear CKA of the layer output"),
    ):
        ax.plot(
            layers, [r[key] for r in rows], marker="o", ms=3, label="with its input" if key == "cka_input" else None
        )
        for u in used:
            ax.axvline(u, color="C3", ls="--", lw=1)
        ax.set(title=label, xlabel="layer")
    axes[1].set_yscale("log")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[2].plot(layers, [r["cka_final"] for r in rows], marker="o", ms=3, label="with the final features")
    axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=100)
