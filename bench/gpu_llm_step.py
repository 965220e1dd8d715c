"""GPU check and throughput of `LLMBlocks`: correctness on the device, overhead vs the direct HF layer loop,
and tokens/s, peak memory and MFU of training steps. Never part of the test suite.

Shapes default to SmolLM2-135M (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536), built with
`random:llama` so no weights need to travel. Usage (on a CUDA machine):

    python bench/gpu_llm_step.py [--batch 64] [--tokens 197] [--layers 30] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from mmblocks.llm import load_blocks
from mmblocks.llm.sources import SMOLLM2_135M_SHAPE


def cuda_time(fn, repeats: int, warmup: int) -> float:
    """Median milliseconds of `fn` measured with CUDA events (wall clock on a CPU smoke run)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def flops_per_token_forward(cfg: dict, layers: int, tokens: int) -> float:
    """Matmul FLOPs of one token through `layers` Llama layers (2 per MAC), attention scores included."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    linear = d * d + 2 * d * kv + d * d + 3 * d * f  # q, k, v, o, gate, up, down
    attention = 2 * tokens * d  # QK^T and AV
    return 2 * layers * (linear + attention)


def check_correctness(device: str) -> dict:
    """fp32 oracle on the device: LLMBlocks vs the HF model's own forward (SDPA and eager), and the mask policy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    for impl in ("eager", "sdpa"):
        cfg._attn_implementation = impl
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(device).eval()
        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        ids = torch.randint(0, 256, (2, 33), device=device)
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        blocks = load_blocks(
            folder, [1, 2], attention="causal", rope="native", final_norm="none", attn_implementation=impl
        ).to(device)
        with torch.no_grad():
            out[f"oracle_max_abs_{impl}"] = (blocks(hs[1]) - hs[3]).abs().max().item()
        for mode in ("bidirectional", "causal"):
            b = load_blocks(folder, [0, 1], attention=mode, attn_implementation=impl).to(device)
            x = torch.randn(1, 9, 128, device=device)
            y = x.clone()
            y[:, -1] = torch.randn(128, device=device)
            with torch.no_grad():
                moved = (b(x)[:, 0] - b(y)[:, 0]).abs().max().item()
            out[f"token0_moves_{impl}_{mode}"] = moved > 1e-6
    return out


def bench_training_step(args, impl: str, tune: str, attention: str, fwd_flops: float) -> tuple[str, dict]:
    """One training step of the stack (loss = mean square of the output), LLMBlocks vs the direct layer loop."""
    device = args.device
    b, n = args.batch, args.tokens
    blocks = load_blocks(
        "random:llama",
        range(args.layers),
        config_overrides=SMOLLM2_135M_SHAPE,
        tune=tune,
        attention=attention,
        attn_implementation=impl,
        dtype=torch.bfloat16,
        seed=0,
    ).to(device)
    blocks.train()
    x = torch.randn(b, n, 576, device=device, dtype=torch.bfloat16, requires_grad=True)
    kwargs = blocks.layer_kwargs(b, n, None, torch.device(device), torch.bfloat16)["full_attention"]
    opt = torch.optim.AdamW(blocks.trainable_parameters(), lr=1e-5, fused=device == "cuda") if tune == "full" else None

    def direct():
        h = x
        for layer in blocks.layers:
            h = layer(h, **kwargs)
        h.float().square().mean().backward()

    def ours():
        blocks(x).float().square().mean().backward()

    def step(fn):
        fn()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_ours = cuda_time(lambda: step(ours), args.repeats, args.warmup)
    t_direct = cuda_time(lambda: step(direct), args.repeats, args.warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    # backward of a frozen stack computes input gradients only (~1x forward); trainable weights: ~2x forward
    step_flops = fwd_flops * (2 if tune == "frozen" else 3)
    name = f"{impl} {tune} {attention} fwd+bwd" + ("+adamw" if opt else "")
    return name, dict(
        direct_ms=t_direct,
        ours_ms=t_ours,
        ratio=t_ours / t_direct,
        tokens_per_s=b * n / (t_ours / 1e3),
        mfu=step_flops / (t_ours / 1e3) / (args.peak_tflops * 1e12),
        peak_gib=peak,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)"
    results: dict = {"gpu": gpu, "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__
    results.update(check_correctness(device))
    print(json.dumps(results, indent=1))

    b, n = args.batch, args.tokens
    fwd_flops = flops_per_token_forward(SMOLLM2_135M_SHAPE, args.layers, n) * b * n
    print(
        f"\nSmolLM2-135M-shaped stack: {args.layers} layers, batch {b} x {n} tokens, bf16 "
        f"({fwd_flops / 1e12:.3f} TFLOP per forward)"
    )
    print(
        f"{'setting':<34} {'direct ms':>10} {'LLMBlocks ms':>13} {'ratio':>6} {'tokens/s':>12} {'MFU':>6} "
        f"{'peak GiB':>9}"
    )
    for impl in ("sdpa", "eager"):
        for tune, attention in (("frozen", "bidirectional"), ("full", "bidirectional"), ("full", "causal")):
            try:
                name, row = bench_training_step(args, impl, tune, attention, fwd_flops)
            except Exception as err:  # report and go on: one failing setting must not lose the others
                print(f"{impl} {tune} {attention}: FAILED {type(err).__name__}: {err}")
                continue
            results[name] = row
            print(
                f"{name:<34} {row['direct_ms']:>10.2f} {row['ours_ms']:>13.2f} {row['ratio']:>6.3f} "
                f"{row['tokens_per_s']:>12,.0f} {row['mfu']:>6.1%} {row['peak_gib']:>9.2f}"
            )
            if device == "cuda":
                torch.cuda.empty_cache()

    # forward-only throughput of the frozen stack (inference / feature extraction)
    blocks = (
        load_blocks(
            "random:llama",
            range(args.layers),
            config_overrides=SMOLLM2_135M_SHAPE,
            attn_implementation="sdpa",
            dtype=torch.bfloat16,
            seed=0,
        )
        .to(device)
        .eval()
    )
    x = torch.randn(b, n, 576, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        t = cuda_time(lambda: blocks(x), args.repeats, args.warmup)
    results["sdpa frozen forward"] = dict(
        ours_ms=t, tokens_per_s=b * n / (t / 1e3), mfu=fwd_flops / (t / 1e3) / (args.peak_tflops * 1e12)
    )
    print(
        f"{'sdpa frozen forward (no grad)':<34} {'':>10} {t:>13.2f} {'':>6} {b * n / (t / 1e3):>12,.0f} "
        f"{results['sdpa frozen forward']['mfu']:>6.1%}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
