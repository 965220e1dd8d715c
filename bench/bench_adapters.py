"""Adapters, forward throughput: every adapter in `adapters.list_adapters()` at one common setting.

Input: `Tokens` of a ViT-S-like image encoder — batch 32 x (cls + 16 x 16 grid) = 257 tokens of width 384 — projected
to a SmolLM2-135M-like width 576, fp32 on the CPU, under `torch.inference_mode`. Adapters that reduce the token count
get a budget of 64 output tokens: `pool` grid_out=8 (exact, and adaptive), `perceiver` num_latents=64, `frame_stack`
k=4 (256 / 4), `pixel_shuffle` scale=2 (8 x 8), `qformer` (and any other adapter with a ``*quer*`` / ``*latent*``
argument) 64 queries; every other argument is the adapter's default. `linear` and `mlp` keep all 257 tokens.
`qformer` is included when `adapters.qformer` imports.

Rates are input tokens per second (B x 257 / forward time). `vs linear` = the adapter's rate / `linear`'s rate, both
measured in the same run (the reference). Two more references, also timed in the same run: Open-Qwen2VL's
`AvgPoolProjector` written from its description (`F.adaptive_avg_pool2d` on the reshaped grid, then
Linear-GELU-Linear) against `pool` adaptive, and `transformers`' `Idefics3Connector.pixel_shuffle` + the same linear
against `pixel_shuffle` (skipped with ``--no-hf``). Each rate is the median of round-robin repeats (the rows take
turns, so they share the machine's load).

Usage: python bench/bench_adapters.py [--batch 32] [--repeats 5] [--threads N] [--no-hf]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import adapters
import adapters.frame_stack
import adapters.perceiver
import adapters.pixel_shuffle
import adapters.pool
from tokenizers_mm import Tokens

try:
    import adapters.qformer  # written in parallel; optional here
except ImportError as err:  # pragma: no cover - depends on the checkout
    print(f"(qformer not benchmarked: {err})")

BUDGET_KWARGS = {
    "pool": {"grid_out": 8, "mode": "exact"},
    "perceiver": {"num_latents": 64},
    "frame_stack": {"k": 4},
    "pixel_shuffle": {"scale": 2},
}


def budget_kwargs(name: str, budget: int) -> dict:
    """The arguments that give `name` a budget of `budget` output tokens (none for unknown adapters)."""
    if name in BUDGET_KWARGS:
        return dict(BUDGET_KWARGS[name])
    cls = adapters.registry.ADAPTERS.get(name)
    params = inspect.signature(cls.__init__).parameters
    return {p: budget for p in params if "quer" in p or "latent" in p}


class AvgPoolProjector(nn.Module):
    """Open-Qwen2VL's (prismatic) projector: (B, N, D) -> (B, D, sqrt N, sqrt N), AdaptiveAvgPool2d, then MLP."""

    def __init__(self, mlp: nn.Module, side: int, out_side: int):
        super().__init__()
        self.mlp, self.side, self.out_side = mlp, side, out_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, self.side, self.side)
        x = F.adaptive_avg_pool2d(x, (self.out_side, self.out_side)).flatten(2).transpose(1, 2)
        return self.mlp(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--in-dim", type=int, default=384)
    parser.add_argument("--out-dim", type=int, default=576)
    parser.add_argument("--side", type=int, default=16, help="the token grid is side x side, plus a cls token")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers Idefics3 reference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, d_in, d_out, side = args.batch, args.in_dim, args.out_dim, args.side
    n = 1 + side * side
    rows, cols = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    pos = torch.cat([torch.full((1, 2), -1.0), torch.stack([rows.flatten(), cols.flatten()], -1)])
    tokens = Tokens(
        x=torch.randn(b, n, d_in), pos=pos.expand(b, -1, -1), grid=(side, side), num_prefix=1, modality="image"
    )
    budget = 64
    grid_x = tokens.grid_tokens().contiguous()  # what the references get: the grid tokens, cls already dropped

    rows_: dict[str, tuple[nn.Module, Callable[[], torch.Tensor]]] = {}
    for name in adapters.list_adapters():
        kw = budget_kwargs(name, budget)
        try:
            a = adapters.create_adapter(name, d_in, d_out, **kw).eval()
        except (TypeError, ValueError) as err:
            print(f"(skipping {name}: {err})")
            continue
        label = f"{name} ({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else name
        rows_[label] = (a, lambda a=a: a(tokens).x)
        if name == "pool":
            ad = adapters.create_adapter(name, d_in, d_out, **{**kw, "mode": "adaptive"}).eval()
            rows_["pool (grid_out=8, mode=adaptive)"] = (ad, lambda a=ad: a(tokens).x)
            ref = AvgPoolProjector(ad.proj, side, 8).eval()
            rows_["  ref: Open-Qwen2VL AvgPoolProjector"] = (ref, lambda r=ref: r(grid_x))
        if name == "pixel_shuffle" and not args.no_hf:
            try:
                from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
            except ImportError as err:  # pragma: no cover
                print(f"(no Idefics3 reference: {err})")
            else:
                shuffle, proj = Idefics3Connector.pixel_shuffle, a.proj
                rows_["  ref: HF Idefics3 pixel_shuffle + linear"] = (
                    proj,
                    lambda s=shuffle, p=proj: p(s(None, grid_x, 2)),
                )

    outputs, times = {}, {label: [] for label in rows_}
    with torch.inference_mode():
        for label, (_, fn) in rows_.items():  # warm-up, and the outputs to check
            outputs[label] = fn()
        for _ in range(args.repeats):
            for label, (_, fn) in rows_.items():
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)

    ref_pairs = [
        ("pool (grid_out=8, mode=adaptive)", "  ref: Open-Qwen2VL AvgPoolProjector"),
        ("pixel_shuffle (scale=2)", "  ref: HF Idefics3 pixel_shuffle + linear"),
    ]
    for ours, ref in ref_pairs:
        if ours in outputs and ref in outputs:
            torch.testing.assert_close(outputs[ours], outputs[ref], msg=f"{ours} must equal {ref}")

    print(
        f"torch {torch.__version__}, cpu fp32, threads {torch.get_num_threads()}: batch {b} x {n} tokens "
        f"(cls + {side}x{side}) x {d_in} -> {d_out}; median of {args.repeats} round-robin repeats"
    )
    base = statistics.median(times["linear"]) if "linear" in times else None
    head = f"{'adapter':<44} {'out tokens':>10} {'params':>11} {'ms':>9} {'tokens/s':>11} {'vs linear':>9}"
    print(head)
    print("-" * len(head))
    for label, (module, _) in rows_.items():
        t = statistics.median(times[label])
        params = sum(p.numel() for p in module.parameters())
        ratio = f"{base / t:>8.2f}x" if base else ""
        print(f"{label:<44} {outputs[label].shape[1]:>10} {params:>11,} {t * 1e3:>9.1f} {b * n / t:>11,.0f} {ratio:>9}")
    for ours, ref in ref_pairs:
        if ours in times and ref in times:
            r = statistics.median(times[ref]) / statistics.median(times[ours])
            print(f"{ours.split(' ')[0]} vs{ref.split(':')[1]}: {r:.2f}x the reference's rate (outputs equal)")


if __name__ == "__main__":
    main()
