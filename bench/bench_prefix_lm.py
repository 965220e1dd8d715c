"""`PrefixLMHead` overhead: a training step and batched greedy decoding, against the `transformers` model alone.

1. Training step (forward + ``loss.backward()``), batch B x (N modality tokens + T text tokens with labels), LM
   frozen (eval mode), begin / end markers on. The modality tokens (``Tokens(randn(B, N, D) * 0.02)``, D = the LM
   width) require grad, so backward runs through the whole LM in both arms. Head: ``PrefixLMHead(lm)(tokens,
   input_ids, labels=labels).loss.backward()`` (splice, LM, loss). Reference: the LM called directly on the SAME
   spliced inputs (``out.batch`` of one head forward: ``inputs_embeds`` detached and made to require grad,
   ``attention_mask``, ``position_ids``, ``use_cache=False``) with the same shifted ``F.cross_entropy`` on
   ``out.batch.labels``; both losses are checked equal. Goal: head / HF <= 1.05x.
2. Batched greedy generation, new tokens/s: B samples of N modality tokens with different real lengths
   (`Tokens.mask`; N, 3N/4, N/2, N/4 real tokens) and T text tokens. Head: ``head.generate(tokens, input_ids,
   max_new_tokens=G, min_new_tokens=G, do_sample=False)`` (splice, left padding, the LM's own ``generate`` from
   ``inputs_embeds``). Reference: ``lm.generate(input_ids, attention_mask, ...)`` with the same arguments on a
   left-padded text prompt of random ids with the same per-sample lengths (N_b + 2 markers + T). ``min_new_tokens``
   = ``max_new_tokens`` fixes the number of generated tokens (EOS is suppressed), so both arms do equal work.
   Goal: head / HF >= 0.95x.

Each repeat runs both arms once, alternating which goes first (interleaved, so both see the same machine load),
after warm-up; medians. ``OMP_WAIT_POLICY`` is set to ``PASSIVE`` unless already set: on a machine running anything
else, OpenMP's spin-waiting made the 32-token SmolLM2 generate of the HF arm take 54 s instead of 3.5 s (2 cores, a
test suite running beside it). Default: the real SmolLM2-135M, fp32, torch on 2 threads (about 3 minutes);
``--quick``: a tiny random Llama (hidden 64, 2 layers, vocab 256) and fewer repeats, to check that the script runs.
Usage: python bench/bench_prefix_lm.py [--source smollm2-135m] [--quick] [--warmup 3] [--repeats 7] [--threads 2]
       [--batch 4] [--train-tokens 64] [--train-text 32] [--gen-tokens 16] [--gen-text 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Before torch loads OpenMP: with its default spin-waiting, every parallel op waits for a descheduled thread when
# anything else runs on the machine, and decoding (many small ops) slowed 25x in a trial (see bench_points.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from mmblocks.heads.prefix_lm import IGNORE_INDEX, PrefixLMHead
from mmblocks.llm.lm import load_lm, load_tokenizer
from tokenizers_mm import Tokens

QUICK_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


def _interleaved(ref, ours, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds of `ref` and `ours`, each repeat running both and alternating which goes first."""
    for _ in range(warmup):
        ref(), ours()
    t_ref, t_ours = [], []
    for i in range(repeats):
        order = ((ref, t_ref), (ours, t_ours)) if i % 2 == 0 else ((ours, t_ours), (ref, t_ref))
        for fn, acc in order:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(t_ref), statistics.median(t_ours)


def _shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The head's loss: mean next-token cross-entropy in fp32, -100 ignored."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def bench_train(head: PrefixLMHead, args: argparse.Namespace, vocab: int) -> tuple[float, float, float]:
    b, n, t, d = args.batch, args.train_tokens, args.train_text, head.hidden_size
    x = (torch.randn(b, n, d) * 0.02).requires_grad_(True)
    tokens = Tokens(x, modality="image")
    input_ids = torch.randint(3, vocab, (b, t))
    labels = input_ids.clone()
    lm = head.lm

    with torch.no_grad():
        spliced = head(tokens, input_ids, labels=labels).batch
    embeds = spliced.inputs_embeds.detach().clone().requires_grad_(True)

    def run_head() -> torch.Tensor:
        x.grad = None
        head.zero_grad(set_to_none=True)
        loss = head(tokens, input_ids, labels=labels).loss
        loss.backward()
        return loss.detach()

    def run_hf() -> torch.Tensor:
        embeds.grad = None
        logits = lm(
            inputs_embeds=embeds,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids,
            use_cache=False,
        ).logits
        loss = _shifted_ce(logits, spliced.labels)
        loss.backward()
        return loss.detach()

    diff = float((run_head() - run_hf()).abs())
    r, o = _interleaved(run_hf, run_head, args.warmup, args.repeats)
    return r, o, diff


def bench_generate(head: PrefixLMHead, args: argparse.Namespace, vocab: int, pad_id: int) -> tuple[float, float]:
    b, n, t, g, d = args.batch, args.gen_tokens, args.gen_text, args.new_tokens, head.hidden_size
    real = [max(1, n - (i * n) // 4) for i in range(b)]  # 16, 12, 8, 4 for N = 16
    mask = torch.arange(n)[None] < torch.tensor(real)[:, None]
    tokens = Tokens(torch.randn(b, n, d) * 0.02, mask=mask, modality="image")
    input_ids = torch.randint(3, vocab, (b, t))

    # The reference prompt: random text ids of the same per-sample lengths (N_b + 2 markers + T), left-padded.
    lengths = [r + 2 + t for r in real]
    length = max(lengths)
    ref_ids = torch.full((b, length), pad_id, dtype=torch.long)
    ref_mask = torch.zeros(b, length, dtype=torch.long)
    for i, ln in enumerate(lengths):
        ref_ids[i, length - ln :] = torch.randint(3, vocab, (ln,))
        ref_mask[i, length - ln :] = 1

    kw = dict(max_new_tokens=g, min_new_tokens=g, do_sample=False, pad_token_id=pad_id)

    def run_head() -> torch.Tensor:
        return head.generate(tokens, input_ids, **kw)

    def run_hf() -> torch.Tensor:
        with torch.no_grad():
            return head.lm.generate(input_ids=ref_ids, attention_mask=ref_mask, **kw)[:, length:]

    new_head, new_hf = run_head(), run_hf()
    if tuple(new_head.shape) != (b, g) or tuple(new_hf.shape) != (b, g):
        got = f"{tuple(new_head.shape)} / {tuple(new_hf.shape)}"
        raise RuntimeError(f"expected [{b}, {g}] new ids from both, got {got}")
    return _interleaved(run_hf, run_head, args.warmup, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and 1 warm-up + 3 repeats")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (3 with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-tokens", type=int, default=64, help="modality tokens per sample (training step)")
    parser.add_argument("--train-text", type=int, default=32, help="text tokens per sample (training step)")
    parser.add_argument("--gen-tokens", type=int, default=16, help="modality tokens per sample (generation)")
    parser.add_argument("--gen-text", type=int, default=8, help="text tokens per sample (generation)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.quick:
        args.source = "random:llama"
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.source.startswith("random:"):
        lm = load_lm(args.source, config_overrides=QUICK_CONFIG if args.quick else None, seed=0)
        pad_id = 0
    else:
        lm = load_lm(args.source)
        tok = load_tokenizer(args.source)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    vocab = lm.get_input_embeddings().weight.shape[0]
    head = PrefixLMHead(lm, markers=True)
    b, g = args.batch, args.new_tokens
    real = [max(1, args.gen_tokens - (i * args.gen_tokens) // 4) for i in range(b)]

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, source {args.source}, fp32, "
        f"hidden {head.hidden_size}, vocab {vocab}, attn {lm.config._attn_implementation}, "
        f"warm-up {args.warmup}, repeats {args.repeats} (interleaved, medians)"
    )
    print(
        f"training step: batch {b} x ({args.train_tokens} modality + 2 markers + {args.train_text} text) = "
        f"{args.train_tokens + 2 + args.train_text} tokens, frozen LM, modality tokens require grad"
    )
    print(
        f"generation: batch {b}, {args.gen_tokens} modality tokens (real {real}) + 2 markers + {args.gen_text} text, "
        f"{g} new tokens (greedy, min_new_tokens = max_new_tokens), pad id {pad_id}"
    )

    t0 = time.perf_counter()
    tr_hf, tr_head, loss_diff = bench_train(head, args, vocab)
    t1 = time.perf_counter()
    gen_hf, gen_head = bench_generate(head, args, vocab, pad_id)
    t2 = time.perf_counter()
    rate_hf, rate_head = b * g / gen_hf, b * g / gen_head

    print()
    print(f"{'measurement':<34} {'HF':>12} {'PrefixLMHead':>13} {'head / HF':>10}")
    rows = (
        ("train fwd+bwd (median ms)", tr_hf * 1e3, tr_head * 1e3),
        ("generate (new tokens/s)", rate_hf, rate_head),
        ("generate (median ms per call)", gen_hf * 1e3, gen_head * 1e3),
    )
    for name, ref, ours in rows:
        print(f"{name:<34} {ref:>12.1f} {ours:>13.1f} {ours / ref:>9.3f}x")
    print()
    print(f"train step time ratio head / HF: {tr_head / tr_hf:.3f}x (goal <= 1.05x)")
    print(f"|loss head - loss HF| = {loss_diff:.2e} (same spliced inputs)")
    print(f"generation tokens/s ratio head / HF: {rate_head / rate_hf:.3f}x (goal >= 0.95x)")
    print(f"(train section {t1 - t0:.1f} s, generation section {t2 - t1:.1f} s)")


if __name__ == "__main__":
    main()
