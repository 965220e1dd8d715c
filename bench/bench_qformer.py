"""Q-Former forward, batch 32 x 256 encoder tokens: our `QFormer` vs `transformers.Blip2QFormerModel`.

Both run the same config and the same random weights (biases random too; ours is `QFormer.from_hf(hf, query_tokens)`,
no output projection, so both return the ``[B, Q, hidden]`` last hidden state of the queries). HF runs with
``attn_implementation="sdpa"`` (Blip2QFormerModel supports sdpa, eager and flex; flash-attention is off for it),
called as in `Blip2Model.get_qformer_features`: ``qformer(query_embeds=query_tokens.expand(B, -1, -1),
encoder_hidden_states=x, encoder_attention_mask=mask)``. Rows: fp32 and bf16 (weights and inputs cast), each without
a mask and with a padding mask (up to a quarter of the tokens padded). Each repeat runs both models once, alternating
which goes first (interleaved, so both see the same machine load); medians under `torch.inference_mode` are printed,
with the max abs difference between the outputs and, for each, the max abs error against HF in fp32 (what bf16
rounding costs both). Goal: ours / HF <= 1.0x.

Default config: a BLIP-2-like but smaller Q-Former (4 layers, hidden 384, 6 heads, FFN 1536, cross-attention every
2nd layer, 32 queries, encoder width 768 = ViT-B) so that the default run stays under about a minute on 2 cores;
``--full`` uses BLIP-2's (12 layers, hidden 768, 12 heads, FFN 3072, encoder width 1408 = EVA ViT-g).
Usage: python bench/bench_qformer.py [--batch 32] [--tokens 256] [--repeats 3] [--full] [--dtypes fp32 bf16]
       [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from adapters.qformer import QFormer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(full: bool) -> tuple[Blip2QFormerModel, torch.Tensor]:
    if full:
        kw = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        kw["encoder_hidden_size"] = 1408
    else:
        kw = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536)
        kw["encoder_hidden_size"] = 768
    config = Blip2QFormerConfig(cross_attention_frequency=2, **kw)
    torch.manual_seed(0)
    hf = Blip2QFormerModel._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # HF initialises biases to zero; trained Q-Formers have non-zero ones
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    query_tokens = torch.randn(1, 32, config.hidden_size) * 0.02
    return hf, query_tokens


def runners(hf: Blip2QFormerModel, ours: QFormer, q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None):
    def run_hf() -> torch.Tensor:
        return hf(query_embeds=q, encoder_hidden_states=x, encoder_attention_mask=mask).last_hidden_state

    def run_ours() -> torch.Tensor:
        return ours(x, mask)

    return run_hf, run_ours


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="BLIP-2's full Q-Former config (slow on 2 cores)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hf, query_tokens = build(args.full)
    ours = QFormer.from_hf(hf, query_tokens).eval()
    c = hf.config
    print(
        f"config: layers={c.num_hidden_layers} hidden={c.hidden_size} heads={c.num_attention_heads} "
        f"ffn={c.intermediate_size} cross_every={c.cross_attention_frequency} queries={query_tokens.shape[1]} "
        f"encoder_width={c.encoder_hidden_size} | batch={args.batch} tokens={args.tokens} repeats={args.repeats} "
        f"threads={torch.get_num_threads()} | HF attn_implementation={c._attn_implementation}"
    )
    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(args.batch, args.tokens, c.encoder_hidden_size, generator=g)
    lengths = torch.randint(args.tokens * 3 // 4, args.tokens + 1, (args.batch,), generator=g)
    lengths[0] = args.tokens * 3 // 4
    pad_mask = torch.arange(args.tokens)[None] < lengths[:, None]

    masks = {"none": None, "padded": pad_mask}
    fp32_ref = {}  # HF fp32 outputs: the accuracy reference of the bf16 rows
    if "fp32" not in args.dtypes:
        with torch.inference_mode():
            for key, mask in masks.items():
                fp32_ref[key] = runners(hf, ours, query_tokens.expand(args.batch, -1, -1), x32, mask)[0]()

    print(
        f"{'dtype':6} {'mask':6} {'HF ms':>9} {'ours ms':>9} {'ours/HF':>8} {'|ours-HF|':>10} "
        f"{'HF err':>9} {'ours err':>9}   (max abs; err = vs HF fp32)"
    )
    for name in args.dtypes:
        dtype = DTYPES[name]
        hf.to(dtype)
        ours.to(dtype)
        q = query_tokens.to(dtype).expand(args.batch, -1, -1)
        x = x32.to(dtype)
        for key, mask in masks.items():
            run_hf, run_ours = runners(hf, ours, q, x, mask)
            t_hf, t_ours = [], []
            with torch.inference_mode():
                _, ref = timed(run_hf)  # warm-up
                _, out = timed(run_ours)
                ref, out = ref.float(), out.float()
                fp32_ref.setdefault(key, ref)
                diff = (ref - out).abs().max().item()
                err_hf, err_ours = ((t - fp32_ref[key]).abs().max().item() for t in (ref, out))
                for r in range(args.repeats):
                    order = [(run_hf, t_hf), (run_ours, t_ours)]
                    for fn, acc in order if r % 2 == 0 else order[::-1]:
                        acc.append(timed(fn)[0])
            m_hf, m_ours = statistics.median(t_hf), statistics.median(t_ours)
            print(
                f"{name:6} {key:6} {m_hf * 1e3:9.1f} {m_ours * 1e3:9.1f} {m_ours / m_hf:7.2f}x {diff:10.2e} "
                f"{err_hf:9.2e} {err_ours:9.2e}"
            )


if __name__ == "__main__":
    main()
