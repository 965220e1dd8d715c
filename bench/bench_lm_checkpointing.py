"""Gradient checkpointing through a frozen LM (`mmblocks.llm.set_lm_checkpointing`): activation memory and step time.

A frozen LM runs in eval mode, where `transformers`' own ``gradient_checkpointing_enable`` does nothing, yet backward
still goes through every layer to reach the adapter below it, keeping each layer's activations. The step:
``PrefixLMHead(lm, mlp adapter)(tokens, input_ids, labels).loss.backward()`` on B x (N modality + T text) tokens.
Memory: the bytes autograd saves for backward in one forward (every tensor a ``saved_tensors_hooks`` pack sees,
counted exactly; a deterministic count, not a noisy RSS reading). Time: forward + backward, medians of interleaved
repeats after warm-up. Reference: the same head without checkpointing, in the same run; the adapter's gradients are
checked identical.

Usage: python bench/bench_lm_checkpointing.py [--source smollm2-135m] [--quick] [--batch 4] [--tokens 192]
       [--text 64] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from adapters import create_adapter
from mmblocks.heads import PrefixLMHead
from mmblocks.llm import load_lm, set_lm_checkpointing
from tokenizers_mm import Tokens

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
)


def step(head: PrefixLMHead, tokens: Tokens, ids: torch.Tensor) -> tuple[int, float, list[torch.Tensor]]:
    """(saved bytes, seconds, adapter gradients) of one forward + backward."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    head.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head(tokens, ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - start
    return sum(saved), seconds, [p.grad.clone() for p in head.adapter.parameters()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama, to check that the script runs")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=192, help="modality tokens per sample")
    ap.add_argument("--text", type=int, default=64, help="text tokens per sample (all labelled)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        lm = load_lm("random:llama", config_overrides=TINY, seed=0)
        args.repeats = 2
    else:
        lm = load_lm(args.source)
    width = lm.get_input_embeddings().embedding_dim
    vocab = lm.get_input_embeddings().num_embeddings
    head = PrefixLMHead(lm, create_adapter("mlp", 192, width))
    head.train()  # the adapter trains; the frozen LM stays in eval mode
    tokens = Tokens(torch.randn(args.batch, args.tokens, 192))
    ids = torch.randint(3, vocab, (args.batch, args.text))
    print(
        f"{args.source if not args.quick else 'tiny llama'}: batch {args.batch} x ({args.tokens} modality + 2 "
        f"markers + {args.text} text) tokens, frozen LM in eval mode, {args.threads} threads"
    )
    results: dict[bool, list] = {False: [], True: []}
    grads = {}
    for r in range(args.repeats + 1):  # the first round warms up
        for on in (False, True) if r % 2 == 0 else (True, False):
            set_lm_checkpointing(lm, on)
            saved, seconds, g = step(head, tokens, ids)
            if r > 0:
                results[on].append((saved, seconds))
            grads[on] = g
    set_lm_checkpointing(lm, False)
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True])), "checkpointing changed the gradients"
    mib = {on: results[on][0][0] / 2**20 for on in results}
    sec = {on: statistics.median(s for _, s in results[on]) for on in results}
    print(
        f"saved for backward: {mib[True]:.1f} MiB with checkpointing vs {mib[False]:.1f} MiB without "
        f"({mib[True] / mib[False]:.3f}x)"
    )
    print(
        f"step time: {sec[True] * 1e3:.0f} ms vs {sec[False] * 1e3:.0f} ms ({sec[True] / sec[False]:.2f}x); "
        "adapter gradients identical"
    )


if __name__ == "__main__":
    main()
