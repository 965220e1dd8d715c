"""Batched Kaldi fbank + AST patching vs torchaudio's per-sample `kaldi.fbank` (then the same patching).

Batch 32 x 10 s of 16 kHz audio, AST arguments (128 mel, 10 ms, hanning, htk_compat), pad to 1024 frames,
AST normalisation, Conv2d(1, 768, 16, stride 10) patching. Reports the median of a few repeats for
fbank alone and fbank + patching, and the ratios.
The >= 3x goal is met on GPU (per-sample calls are launch-bound there); on CPU both paths run the same
compute-bound FFTs and the 768-channel conv dominates, so expect roughly 1-1.5x.
Usage: ``python bench/bench_fbank.py [--device cuda] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchaudio.compliance.kaldi as kaldi

from tokenizers_mm.audio import AST_FBANK_KWARGS, AudioPatches, fbank


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (mel matrix cache, cuFFT plans, kernels)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--embed-dim", type=int, default=768)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    sr = 16000
    wav = (torch.randn(args.batch, int(args.seconds * sr)) * 0.1).to(device)
    tok = AudioPatches(embed_dim=args.embed_dim, subtract_waveform_mean=False).to(device).eval()
    kw = dict(AST_FBANK_KWARGS, sample_frequency=sr)

    def ours_fbank():
        return fbank(wav, sr, **{k: v for k, v in kw.items() if k != "sample_frequency"})

    def ref_fbank():
        return torch.stack([kaldi.fbank(wav[i : i + 1], **kw) for i in range(wav.shape[0])])

    def ours_full():
        return tok(wav)

    def ref_full():
        return tok(ref_fbank())  # per-sample torchaudio fbank, then the identical pad/normalise/patching

    with torch.inference_mode():
        diff = (ours_fbank() - ref_fbank()).abs().max().item()
        results = {}
        for name, fn in [
            ("fbank batched", ours_fbank),
            ("fbank per-sample torchaudio", ref_fbank),
            ("fbank+patch batched", ours_full),
            ("fbank+patch per-sample torchaudio", ref_full),
        ]:
            results[name] = _median_time(fn, device, args.repeats)
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"threads={torch.get_num_threads()}, batch={args.batch} x {args.seconds:g} s @ {sr} Hz, "
        f"median of {args.repeats}; max |ours - torchaudio| = {diff:.2e}"
    )
    for name, t in results.items():
        print(f"  {name:36s} {t * 1e3:9.1f} ms")
    r1 = results["fbank per-sample torchaudio"] / results["fbank batched"]
    r2 = results["fbank+patch per-sample torchaudio"] / results["fbank+patch batched"]
    print(f"  speed-up fbank only: {r1:.2f}x   fbank+patching: {r2:.2f}x")


if __name__ == "__main__":
    main()
