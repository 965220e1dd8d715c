"""Training-step time and peak memory: ViT-Tiny vs + frozen SmolLM2 block vs + the same block trainable.

Each arm is one optimizer step (AdamW over the trainable parameters) of the textures encoder (32x32 images, 4x4
patches -> 65 tokens), measured after warm-up; ratios are against the baseline measured in the same run.
Usage: python bench/bench_train_step.py [--batch 64] [--depth 6] [--repeats 10] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time

import psutil
import torch
import torch.nn.functional as F

from mmblocks import build_encoder
from mmblocks.llm.sources import SMOLLM2_135M_SHAPE

ARMS = (("ViT-Tiny", None), ("+ frozen SmolLM2 block", "frozen"), ("+ trainable block (same shape)", "full"))


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.peak, self._stop = psutil.Process(), 0, False
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.thread.join()


def bench_arm(tune: str | None, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    llm = {"enabled": tune is not None, "source": args.llm_source, "tune": tune or "frozen"}
    if args.llm_source.startswith("random:"):  # same shapes and cost without the weights (e.g. on a GPU box)
        llm["config_overrides"] = SMOLLM2_135M_SHAPE
    cfg = {
        "model": {
            "backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": args.depth},
            "llm": llm,
            "num_classes": 20,
        },
    }
    model = build_encoder(cfg).to(args.device).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 20, (args.batch,), device=args.device)

    amp = torch.autocast(args.device, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with amp:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as mem:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    # GPU: peak allocated memory; CPU: how far RSS rises above its level before the timed steps (activations,
    # gradients and temporaries; the warm-up already allocated the optimizer state)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else mem.peak - mem.base
    return {
        "step_s": statistics.median(times),
        "peak_mib": peak / 2**20,
        "trainable": sum(p.numel() for p in model.trainable_parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--llm-source", default="smollm2-135m", help="or random:llama (SmolLM2 shapes, no weights)")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {args.device}, amp {args.amp}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}, ViT-Tiny width 192 x {args.depth} blocks, 65 tokens"
    )
    rows = [(name, bench_arm(tune, args)) for name, tune in ARMS]
    base = rows[0][1]
    mem_label = "peak GPU MiB" if args.device == "cuda" else "step RSS MiB"
    print(f"{'arm':<32} {'trainable':>11} {'step ms':>9} {'x base':>7} {'samples/s':>10} {mem_label:>13} {'x base':>7}")
    for name, r in rows:
        print(
            f"{name:<32} {r['trainable']:>11,} {r['step_s'] * 1e3:>9.1f} {r['step_s'] / base['step_s']:>7.2f} "
            f"{args.batch / r['step_s']:>10.1f} {r['peak_mib']:>13.0f} {r['peak_mib'] / base['peak_mib']:>7.2f}"
        )


if __name__ == "__main__":
    main()
