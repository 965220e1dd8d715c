"""Demos.

`mmblocks demo` (`run_demo`): the center paper's experiment on offline data — a ViT trained from scratch on the
`textures` shards, three arms (baseline, + the frozen last block of SmolLM2-135M, + the same block re-initialised
and frozen), a table of test accuracy per arm and a comparison report.

`mmblocks blocks demo` (`run_blocks_demo`): one real SmolLM2 block on its own, with the parameter table of every
tuning mode.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from tokenizers_mm import Tokens

from .llm import TUNE_MODES, load_blocks

__all__ = ["run_demo", "run_blocks_demo", "DEMO_ARMS"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "image"
DEMO_ARMS = (
    ("baseline", "textures_vit_tiny.yaml"),
    ("+ frozen SmolLM2 block", "textures_vit_tiny_smollm2.yaml"),
    ("+ random-init block", "textures_vit_tiny_smollm2_random.yaml"),
)
QUICK_OVERRIDES = (
    "data.dataset=digits",
    "data.channels=1",
    "data.image_size=16",
    "model.backbone.img_size=16",
    "model.backbone.patch_size=4",
    "model.backbone.depth=1",
    "data.batch_size=16",
    "train.max_steps=2",
    "train.epochs=1",
    "train.tensorboard=false",
    "train.progress=false",
    "data.num_workers=0",
)


DEMO_EPOCHS = 3  # a few minutes per arm on 2 CPU cores; the configs themselves train 15 epochs


def run_demo(quick: bool = False, out: str | Path = "runs/demo", epochs: int | None = DEMO_EPOCHS) -> list[dict]:
    """Train the three arms of `DEMO_ARMS` and print a table of their test accuracy; returns the summaries.

    ``quick`` trains two steps of a one-block ViT on `digits` per arm (for tests); ``epochs`` overrides the
    configs' epoch count.
    """
    from .recipes import train
    from .train import compare_runs_table

    out = Path(out)
    data_root = out / "data" / ("digits" if quick else "textures")
    rows = []
    for arm, config in DEMO_ARMS:
        path = CONFIG_DIR / config
        if not path.is_file():
            raise FileNotFoundError(f"demo config {path} not found (the demo runs from a source checkout)")
        overrides = [f"data.root={data_root}", f"train.out_dir={out / path.stem}", f"name={path.stem}"]
        if quick:
            overrides += list(QUICK_OVERRIDES)
        if epochs is not None:
            overrides.append(f"train.epochs={epochs}")
        print(f"\n=== {arm}: {path.name} ===")
        summary = train(path, overrides, overwrite=True)  # a rerun moves the previous demo run aside
        test = summary.get("test") or {}
        rows.append(
            {
                "arm": arm,
                "config": path.name,
                "test_acc": test.get("acc"),
                "best_val_acc": summary["best_val"].get("val_acc"),
                "trainable": summary["trainable_params"],
                "frozen": summary["frozen_params"],
                "samples_per_s": summary["throughput"].get("samples_per_s"),
                "minutes": summary["seconds"] / 60,
                "report": str(out / path.stem / "report" / "report.md"),
            }
        )
    columns = [
        ("arm", "arm"),
        ("test_acc", "test acc"),
        ("best_val_acc", "best val acc"),
        ("trainable", "trainable params"),
        ("frozen", "frozen params"),
        ("samples_per_s", "samples/s"),
        ("minutes", "minutes"),
    ]
    table = compare_runs_table(rows, columns, best={"test_acc": "max"})
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(
        f"# mmblocks demo: {data_root.name}\n\n{table}\n\nReports:\n"
        + "".join(f"- {r['arm']}: {r['report']}\n" for r in rows)
    )
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{table}\n\ncomparison: {out / 'comparison.md'}; per-arm reports under {out}/<config>/report/")
    return rows


def run_blocks_demo(
    source: str = "smollm2-135m", layer: int = -1, batch: int = 8, tokens: int = 197, dim: int = 384
) -> None:
    torch.manual_seed(0)
    print(f"== mmblocks demo: a frozen {source} block as an encoder layer ==")
    t0 = time.perf_counter()
    blocks = load_blocks(source, [layer])
    print(
        f"loaded layer {blocks.layer_indices} of {blocks.source} ({blocks.family}, hidden {blocks.hidden_size}) "
        f"in {time.perf_counter() - t0:.2f} s; attention={blocks.attention}, rope={blocks.rope}, "
        f"final_norm={blocks.final_norm_kind}, backend={blocks.attn_implementation}"
    )
    print(blocks.parameter_table())

    # The center paper's wiring: Linear(d -> D) -> frozen block -> unit RMS norm -> Linear(D -> d).
    adapter_in = nn.Linear(dim, blocks.hidden_size, bias=False)
    adapter_out = nn.Linear(blocks.hidden_size, dim, bias=False)
    x = Tokens(torch.randn(batch, tokens, dim), grid=(14, 14), num_prefix=1, modality="image")
    with torch.no_grad():
        t0 = time.perf_counter()
        hidden = blocks(x.with_x(adapter_in(x.x)))
        y = x.with_x(adapter_out(hidden.x))
        dt = time.perf_counter() - t0
    print(
        f"\nforward of {batch}x{tokens} ViT-S tokens (width {dim}) through adapter -> block -> adapter: "
        f"{dt * 1e3:.1f} ms, {batch * tokens / dt:,.0f} tokens/s; out {tuple(y.x.shape)}, grid {y.grid}"
    )

    # Bidirectional vs causal: does the first token see the last one?
    probe = torch.randn(1, 16, blocks.hidden_size)
    moved = probe.clone()
    moved[:, -1] = torch.randn(blocks.hidden_size)
    with torch.no_grad():
        bi = (blocks(probe)[:, 0] - blocks(moved)[:, 0]).abs().max().item()
        blocks.attention = "causal"
        ca = (blocks(probe)[:, 0] - blocks(moved)[:, 0]).abs().max().item()
        blocks.attention = "bidirectional"
    print(f"token 0 change when the last token changes: bidirectional {bi:.3g}, causal {ca:.3g}")

    print("\ntrainable parameters of the same block under each tuning mode:")
    for tune in TUNE_MODES:
        tuned = load_blocks(source, [layer], tune=tune, final_norm="llm" if tune == "norm" else "rms_unit")
        trainable = sum(p.numel() for p in tuned.trainable_parameters())
        total = sum(p.numel() for p in tuned.parameters())
        print(f"  {tune:<12} {trainable:>12,} trainable of {total:>12,}  ({tuned.num_layers} layer(s))")
