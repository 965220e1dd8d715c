"""`mmblocks demo`: what the package does today, on the real SmolLM2 checkpoint.

Until the image encoder lands (issue 3), the demo loads the last block of SmolLM2-135M the way the center paper
uses LLaMA's (bidirectional, no RoPE, unit RMS norm, frozen), runs ViT-S-shaped tokens through it between two
linear projections, and prints the parameter tables of every tuning mode.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from tokenizers_mm import Tokens

from .llm import TUNE_MODES, load_blocks

__all__ = ["run_demo"]


def run_demo(source: str = "smollm2-135m", layer: int = -1, batch: int = 8, tokens: int = 197, dim: int = 384) -> None:
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
