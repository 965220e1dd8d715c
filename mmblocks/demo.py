"""Demos.

`mmblocks demo` (`run_demo`): the center paper's experiment on offline data as a small `mmblocks study`: a ViT
trained from scratch on the `textures` shards with three arms (baseline, + the frozen last block of SmolLM2-135M,
+ the same block with its weights shuffled: the same scale, no learned structure), paired by seed, with the
difference of each arm from the baseline, its 95% interval when there are several seeds, and a sentence saying
whether it decides anything.

`mmblocks blocks demo` (`run_blocks_demo`): one real SmolLM2 block on its own, with the parameter table of every
tuning mode.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenizers_mm import Tokens

from .llm import TUNE_MODES, load_blocks
from .study import ARMS, StudySpec, run_study

__all__ = ["DEMO_ARMS", "DEMO_RECIPE", "run_blocks_demo", "run_demo"]

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "image" / "textures_vit_tiny_smollm2.yaml"
DEMO_ARMS = ("baseline", "frozen", "shuffled")
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
    "data.num_workers=0",
)


DEMO_EPOCHS = 3  # a few minutes per arm on 2 CPU cores; the configs themselves train 15 epochs


def run_demo(
    quick: bool = False,
    out: str | Path = "runs/demo",
    epochs: int | None = DEMO_EPOCHS,
    seeds: int = 1,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train the arms of `DEMO_ARMS` for `seeds` seeds and report them as a study (`run_study`; ``<out>/study.md``);
    returns the study's data.

    ``quick`` trains two steps of a one-block ViT on `digits` per arm (for tests); ``epochs`` overrides the
    configs' epoch count. One seed cannot decide a difference of a point or two, and the report says so.
    """
    if not DEMO_RECIPE.is_file():
        raise FileNotFoundError(f"demo config {DEMO_RECIPE} not found (the demo runs from a source checkout)")
    out = Path(out)
    data_root = out / "data" / ("digits" if quick else "textures")
    overrides = [f"data.root={data_root}", "train.progress=false"]
    if quick:
        overrides += list(QUICK_OVERRIDES)
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    spec = StudySpec(
        recipes=[DEMO_RECIPE],
        arms={arm: ARMS[arm] for arm in DEMO_ARMS},
        seeds=list(range(seeds)),
        reference="baseline",
        overrides=overrides,
        jobs=jobs,
        out=out,
    )
    return run_study(spec)


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
