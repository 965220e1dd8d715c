"""Look inside trained runs: `mmblocks blocks analyze` (which LLM layer to use, measured on a run's real tokens) and
`mmblocks blocks maps` (activation maps before and after the LLM stage, and how much they concentrate on the
object), each from a run folder and shards."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .analysis.activation_maps import foreground_auc, patch_foreground, plot_activation_maps, token_norm_maps
from .analysis.block_scan import plot_layer_scan, rank_layers, scan_layers
from .analysis.capture import Captured, capture_encoder
from .builders import build_encoder
from .config import ConfigError
from .llm import resolve_source
from .recipes import make_loader, prepare, run_config
from .train.checkpoint import load_trainable_weights, weights_file

__all__ = ["activation_maps", "analyze_blocks", "capture_run"]


def capture_run(
    run: str | os.PathLike, data: str | os.PathLike | None = None, split: str = "val", samples: int = 256
) -> tuple[dict[str, Any], Captured]:
    """The run's encoder (its config.yaml, its trained weights) on up to `samples` of `split` from `data` (default:
    the run's ``data.root``): ``(config, captured tokens)``."""
    overrides = [f"data.root={data}"] if data is not None else []
    cfg, dist, task = prepare(run_config(run), overrides)
    model = build_encoder(cfg, task=task, verbose=False).to(dist.device)
    load_trainable_weights(model, weights_file(run))
    loader = make_loader(cfg, split, train=False, task=task, dist_info=dist)
    try:
        captured = capture_encoder(model, loader, max_samples=samples)
    finally:
        loader.close()
    return cfg, captured


def analyze_blocks(
    run: str | os.PathLike,
    source: str | None = None,
    *,
    data: str | os.PathLike | None = None,
    layers: Sequence[int] | None = None,
    split: str = "val",
    samples: int = 256,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """`scan_layers` of `source` (default: the run's LLM) on the tokens the run's trained ``adapter_in`` gives;
    writes ``blocks.md``, ``blocks.json`` and ``blocks.png`` in `out` (default ``<run>/analysis``)."""
    cfg, captured = capture_run(run, data, split, samples)
    llm = cfg["model"]["llm"]
    if "llm_in" not in captured.tokens:
        raise ConfigError(
            f"{run} has no LLM stage: blocks analyze needs a run whose trained adapter_in maps its tokens to the "
            "LLM's width (a frozen / control arm)"
        )
    source = source or llm["source"]
    wiring = {k: llm[k] for k in ("attention", "rope", "final_norm")}
    rows = scan_layers(source, captured.tokens["llm_in"], captured.pooled, layers, **wiring)
    first, why = rank_layers(rows)
    out_dir = Path(out) if out is not None else Path(run) / "analysis"
    n_layers = int(resolve_source(source).config.num_hidden_layers)
    used = [int(i) % n_layers for i in llm["layers"]] if source == llm["source"] else []
    png = plot_layer_scan(rows, out_dir / "blocks.png", used=used, title=f"{source} on {Path(run).name}")
    lines = [
        f"# Layers of {source} on the tokens of {run}",
        "",
        f"{captured.tokens['llm_in'].x.shape[0]} samples of `{split}`; the run used layer(s) {used or '-'}. "
        f"Input RMS {float(captured.tokens['llm_in'].x.pow(2).mean().sqrt()):.3g}. CKA of the stage's input with the "
        f"final features: {rows[0]['cka_stage_final']:.3f}. CKA(output, final) favours the layer the run was "
        "trained with (its output is what the final features are made of).",
        "",
        "| layer | Block Influence | update RMS | CKA(output, input) | CKA(output, final) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " (used)" if r["layer"] in used else ""
        lines.append(
            f"| {r['layer']}{mark} | {r['block_influence']:.4f} | {r['update_rms']:.4g} | {r['cka_input']:.4f} | "
            f"{r['cka_final']:.4f} |"
        )
    lines += [
        "",
        f"Layers to try first: {first} ({why}).",
        "",
        f"![layers]({png.name})",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "blocks.md").write_text("\n".join(lines) + "\n")
    result = {"source": source, "split": split, "rows": rows, "try_first": first, "why": why, "used": used}
    (out_dir / "blocks.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    return result


def activation_maps(
    runs: Sequence[str | os.PathLike],
    names: Sequence[str] | None = None,
    *,
    data: str | os.PathLike | None = None,
    split: str = "val",
    samples: int = 256,
    out: str | os.PathLike = "runs/activation_maps",
) -> dict[str, dict[str, float]]:
    """Token-norm maps of each run before its LLM stage, after it and at the final norm, on the same images; the
    foreground AUC of each (`foreground_auc`); ``maps.png``, ``maps.md`` and ``maps.json`` in `out`."""
    names = list(names) if names else [Path(r).name for r in runs]
    if len(names) != len(runs):
        raise ConfigError(f"{len(runs)} runs but {len(names)} names")
    table: dict[str, dict[str, float]] = {}
    shown: dict[str, dict[str, Any]] = {}
    images = None
    for name, run in zip(names, runs):
        _, captured = capture_run(run, data, split, samples)
        if captured.inputs.dim() != 4:
            raise ConfigError(
                f"{run}: activation maps need images [B, C, H, W], got inputs {tuple(captured.inputs.shape)}"
            )
        if images is not None and not torch.equal(images, captured.inputs):
            raise ConfigError(f"{run} saw other images than {runs[0]}: compare runs on the same data and split")
        images = captured.inputs if images is None else images
        row, maps = {}, {}
        for place in ("before", "after", "final"):
            tokens = captured.tokens.get(place)
            if tokens is None or tokens.grid is None:
                continue
            m = token_norm_maps(tokens)
            masks = patch_foreground(captured.inputs, tokens.grid)
            row[place] = foreground_auc(m, masks)
            maps[place] = m
        table[name], shown[name] = row, maps
    out_dir = Path(out)
    png = plot_activation_maps(images, shown, out_dir / "maps.png")
    lines = [
        f"# Activation maps on `{split}` ({images.shape[0]} images)",
        "",
        "ROC AUC of each token's feature norm against the object mask (0.5: blind to the object; 1: every object "
        "token above every background token). before: the tokens entering the LLM stage; after: where the stage "
        "ends (the same place in a run without one); final: after the final norm.",
        "",
        "| run | before | after | final |",
        "|---|---|---|---|",
    ]
    for name, row in table.items():
        cells = [f"{row[p]:.3f}" if p in row else "—" for p in ("before", "after", "final")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"![maps]({png.name})"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "maps.md").write_text("\n".join(lines) + "\n")
    (out_dir / "maps.json").write_text(json.dumps(table, indent=1))
    print("\n".join(lines))
    return table
