"""Training-step throughput of the center paper's encoder on a GPU: a ViT-S/16 at 224 px alone, + one frozen
SmolLM2-135M-shaped block, + the same block trained, + one frozen 7B-shaped (Llama-2-7B) block; synthetic images,
bf16 autocast, SDPA, torch.compile off and on. Prints images/s, MFU and peak memory per arm as a markdown table
(and JSON lines). Never part of the test suite (a CPU smoke run of it is).

The blocks are built from `random:llama` configs with the real shapes (the timings do not depend on the weights, and
nothing needs to travel to the GPU machine). FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one
forward + backward (matmuls and attention), so MFU = counted FLOPs / step time / peak (989 TFLOP/s dense bf16 for an
H100 SXM or H200; `--peak-tflops`).

    python bench/gpu_encoder_step.py [--batch 128] [--compile off,on] [--arms baseline,frozen,trainable,frozen_7b]
    python bench/gpu_encoder_step.py --device cpu --small --steps 1      # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmblocks.builders import build_encoder
from mmblocks.llm.sources import SMOLLM2_135M_SHAPE

LLAMA2_7B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
ARMS = {
    "baseline": None,
    "frozen": ("frozen", SMOLLM2_135M_SHAPE),
    "trainable": ("full", SMOLLM2_135M_SHAPE),
    "frozen_7b": ("frozen", LLAMA2_7B_SHAPE),
}


def build(arm: str, img: int, patch: int, depth: int | None, classes: int, device: str) -> torch.nn.Module:
    backbone = {"name": "vit_small_patch16_224", "img_size": img, "patch_size": patch}
    if depth is not None:
        backbone["depth"] = depth
    model: dict = {"backbone": backbone, "num_classes": classes}
    if ARMS[arm] is not None:
        tune, shape = ARMS[arm]
        model["llm"] = {
            "enabled": True,
            "source": "random:llama",
            "config_overrides": dict(shape),
            "layers": [-1],
            "tune": tune,
            "attn_implementation": "sdpa",
        }
    return build_encoder({"model": model, "data": {"channels": 3}}, verbose=False).to(device)


def step_fn(model, images, labels, optimizer, device: str):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step():
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(fn, steps: int, warmup: int, device: str) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(arm: str, compiled: bool, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build(arm, args.img, args.patch, args.depth, 1000, args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=args.device == "cuda")
    images = torch.randn(args.batch, 3, args.img, args.img, device=args.device)
    labels = torch.randint(0, 1000, (args.batch,), device=args.device)
    fn = step_fn(model, images, labels, optimizer, args.device)
    counter = FlopCounterMode(display=False)
    with counter:  # eager, one step: the FLOPs of forward + backward (the optimizer adds none that count)
        fn()
    flops = counter.get_total_flops()
    if compiled:
        model.forward = torch.compile(model.forward)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(fn, args.steps, args.warmup, args.device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return {
        "arm": arm,
        "compile": compiled,
        "batch": args.batch,
        "img": args.img,
        "tokens": (args.img // args.patch) ** 2 + 1,
        "trainable_M": sum(p.numel() for p in trainable) / 1e6,
        "frozen_M": sum(p.numel() for p in model.parameters() if not p.requires_grad) / 1e6,
        "step_ms": seconds * 1e3,
        "images_per_s": args.batch / seconds,
        "tflops_per_step": flops / 1e12,
        "mfu": flops / seconds / (args.peak_tflops * 1e12),
        "peak_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--depth", type=int, default=None, help="ViT depth (default: ViT-S's 12)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", default="off,on", help="off, on or off,on")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--small", action="store_true", help="CPU smoke: 32 px, batch 2, depth 1, one warm-up")
    args = parser.parse_args()
    if args.small:
        args.img, args.batch, args.depth, args.warmup = 32, 2, 1, 1
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(torch.cuda.get_device_name(), f"peak {args.peak_tflops:g} TFLOP/s bf16")
    rows = []
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        if arm not in ARMS:
            parser.error(f"unknown arm {arm!r}: {list(ARMS)}")
        for mode in [m.strip() for m in args.compile.split(",") if m.strip()]:
            row = measure(arm, mode == "on", args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| arm | compile | images/s | step ms | MFU | peak GiB | trainable M | frozen M |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arm']} | {'on' if r['compile'] else 'off'} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | "
            f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {r['trainable_M']:.1f} | {r['frozen_M']:.1f} |"
        )


if __name__ == "__main__":
    main()
