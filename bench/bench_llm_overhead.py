"""Overhead of `LLMBlocks` over calling the same `transformers` layer directly with the same inputs.

Goal: <= 1.03x for forward and forward+backward (SmolLM2 last layer, batch 8 x 197 tokens, fp32).
Usage: python bench/bench_llm_overhead.py [--source smollm2-135m] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmblocks.llm import load_blocks


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _bench_backend(args: argparse.Namespace, impl: str) -> list[tuple[str, str]]:
    blocks = load_blocks(args.source, [-1], final_norm="none", attn_implementation=impl)
    layer = blocks.layers[0]
    x = torch.randn(args.batch, args.tokens, blocks.hidden_size)
    xg = x.clone().requires_grad_(True)
    # The direct call gets exactly what LLMBlocks passes: no mask (the is_causal flag off) and identity rotary.
    kwargs = blocks.layer_kwargs(args.batch, args.tokens, None, x.device, x.dtype)["full_attention"]

    def direct_fwd():
        with torch.no_grad():
            layer(x, **kwargs)

    def ours_fwd():
        with torch.no_grad():
            blocks(x)

    def direct_bwd():
        layer(xg, **kwargs).sum().backward()

    def ours_bwd():
        blocks(xg).sum().backward()

    rows = []
    for name, ref, ours in (("forward", direct_fwd, ours_fwd), ("fwd+bwd", direct_bwd, ours_bwd)):
        for _ in range(args.warmup):
            ref(), ours()
        t_ref, t_ours = [], []
        for _ in range(args.repeats):  # interleaved, so drift on a shared VM hits both alike
            t_ref += _time(ref, 1)
            t_ours += _time(ours, 1)
        r, o = statistics.median(t_ref), statistics.median(t_ours)
        rows.append((name, f"{r * 1e3:>10.2f} {o * 1e3:>13.2f} {o / r:>7.3f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, source {args.source}, "
        f"batch {args.batch} x {args.tokens} tokens, fp32"
    )
    print(f"{'backend':<8} {'pass':<9} {'direct ms':>10} {'LLMBlocks ms':>13} {'ratio':>7}")
    for impl in ("eager", "sdpa"):
        for name, ratio_row in _bench_backend(args, impl):
            print(f"{impl:<8} {name:<9} {ratio_row}")


if __name__ == "__main__":
    main()
