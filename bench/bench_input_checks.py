"""What the tokenizers' input checks (`tokenizers_mm.check_input`: layout, dtype cast, NaN / inf scan) cost.

Rows: the `image_patches` forward alone and a whole training step (forward + backward + AdamW) of a ViT-Tiny encoder
on 32x32 images with 4x4 patches, each with the checks on (the default) and off (``allow_nonfinite=True`` skips the
NaN / inf scan, the part that reads the whole input; the layout and dtype checks are free). The ratio is checked /
unchecked in the same run, interleaved so both see the same machine load.
Usage: python bench/bench_input_checks.py [--batch 64] [--repeats 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mmblocks import build_encoder
from tokenizers_mm import ImagePatches


def _time(fn, flag: bool, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(flag)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    labels = torch.randint(0, 20, (args.batch,), device=args.device)

    toks = {flag: ImagePatches(32, 4, 3, 192, allow_nonfinite=flag).to(args.device) for flag in (False, True)}
    cfg = {"model": {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4}, "num_classes": 20}}
    models = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = build_encoder(cfg).to(args.device).train()
        model.tokenizer.allow_nonfinite = flag
        models[flag] = (model, torch.optim.AdamW(model.trainable_parameters(), lr=1e-4))

    def tokenize(flag: bool):
        with torch.no_grad():
            toks[flag](x)

    def step(flag: bool):
        model, opt = models[flag]
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    print(f"input checks, batch {args.batch} x 3 x 32 x 32, {args.device}, median of {args.repeats}")
    print(f"{'what':<34} {'checked':>10} {'unchecked':>10} {'ratio':>7}")
    for name, fn in (("image_patches forward", tokenize), ("ViT-Tiny training step", step)):
        for flag in (False, True):  # warm-up
            fn(flag)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for flag in (False, True):
                times[flag].append(_time(fn, flag, args.device))
        checked, unchecked = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:<34} {checked * 1e3:>8.2f}ms {unchecked * 1e3:>8.2f}ms {checked / unchecked:>7.3f}")


if __name__ == "__main__":
    main()
