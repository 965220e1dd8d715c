"""Video decode + tokenize throughput (clips/s) and block matching vs a per-block NumPy loop.

Clips: 16-frame mp4s made with `encode_video` (mpeg4, synthetic natural-looking content: a smooth random background
panning slowly and a smooth textured square moving across it), at 64x64 and 112x112. Each clip is processed alone
(batch 1), as a data-loader worker would: ``decode_video(num_frames=16)`` -> `normalize_frames` -> tokenizer.

Rows per size (the decode-only rate is the bound; ``vs decode`` = rate / decode-only rate; each rate is the median
over passes in which every clip goes through every row in turn (`rates`), with the slowest and fastest pass beside it):
  decode            decode_video, 16 uniform frames, RGB conversion
  decode+mvs        decode_video(export_mvs=True): + codec motion vectors -> dense field
  decode+tubelets   + VideoTubelets (Conv3d 2x16x16 -> D, sincos positions)
  decode+bm motion  + MotionTokens(source="block_matching"): block_matching (16x16, search 7) + Conv3d
  decode+codec mot  decode_video(export_mvs=True) + MotionTokens(source="codec")
Then `block_matching` vs `vectorised_block_matching` (the same exhaustive search written the obvious vectorised way
in torch: the fair speed reference) on the rounded luma of one decoded clip, each the fastest of 7 runs, outputs
checked equal to each other and to `numpy_block_matching` (a plain per-block NumPy loop, timed once and shown for
scale only; the test suite's oracle is `tests/test_motion.py`'s).

Usage: python bench/bench_video.py [--sizes 64 112] [--frames 16] [--clips 6] [--seconds 2] [--dim 384] [--threads 1]
       [--thread-type AUTO|FRAME|SLICE|NONE]
``--threads`` sets torch's intra-op threads (default 1: one loader worker's share); FFmpeg decodes with its own
threads (``--thread-type``; default: decode_video's size-based choice). Results vary by tens of percent on the 2-core CI
machines: compare ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import av
import numpy as np
import torch
import torch.nn.functional as F

from mmblocks.data.video_io import decode_video, encode_video
from tokenizers_mm.motion import MotionTokens, block_matching, luminance
from tokenizers_mm.video import VideoTubelets, normalize_frames


def numpy_block_matching(luma: torch.Tensor, block: int = 16, search: int = 7) -> np.ndarray:
    """`block_matching`'s search as a plain per-block NumPy loop on luma ``[B, T, 1, H, W]``. Slow.

    For block ``(r, c)`` of frame ``t+1``, every ``(dx, dy)`` with ``|dx|, |dy| <= search``:
    ``SAD = sum |Y[t+1](p) - Y[t](p - (dx, dy))|`` with frame ``t`` edge-extended; the smallest SAD wins, ties going
    to the smallest ``dx^2 + dy^2``, then ``dy``, then ``dx`` (`block_matching`'s documented rule).
    """
    y = luma.numpy()[:, :, 0].astype(np.float64)
    b, t, h, w = y.shape
    hb, wb, s = h // block, w // block, search
    window = range(-s, s + 1)
    order = sorted(((dx, dy) for dy in window for dx in window), key=lambda d: (d[0] ** 2 + d[1] ** 2, d[1], d[0]))
    out = np.zeros((b, t - 1, 2, hb, wb), np.float32)
    for i in range(b):
        for j in range(t - 1):
            ref = np.pad(y[i, j], s, mode="edge")
            cur = y[i, j + 1]
            for r in range(hb):
                for c in range(wb):
                    blk = cur[r * block : (r + 1) * block, c * block : (c + 1) * block]
                    best, best_d = None, (0, 0)
                    for dx, dy in order:
                        y0, x0 = r * block - dy + s, c * block - dx + s
                        sad = np.abs(blk - ref[y0 : y0 + block, x0 : x0 + block]).sum()
                        if best is None or sad < best:
                            best, best_d = sad, (dx, dy)
                    out[i, j, :, r, c] = best_d
    return out


def _smooth(rng: np.random.Generator, h: int, w: int, cell: int = 8) -> np.ndarray:
    cells = torch.from_numpy(rng.random((h // cell + 3, w // cell + 3), dtype=np.float32))[None, None]
    up = F.interpolate(cells, scale_factor=cell, mode="bicubic", align_corners=False)[0, 0]
    return ((up - up.min()) / (up.max() - up.min()) * 255).numpy()


def synthetic_clip(t: int, size: int, seed: int) -> np.ndarray:
    """uint8 ``[T, size, size, 3]``: a smooth colour background panning 1 px/frame and a smooth square moving."""
    rng = np.random.default_rng(seed)
    pad = t + 8
    bg = np.stack([_smooth(rng, size + pad, size + pad) for _ in range(3)], -1)
    sq = size // 3
    tex = np.stack([_smooth(rng, sq, sq) for _ in range(3)], -1)[:sq, :sq]
    vx, vy = rng.integers(-3, 4, 2)
    frames = []
    for i in range(t):
        f = bg[i : i + size, i // 2 : i // 2 + size].copy()
        x = int(np.clip(size // 3 + vx * (i - t // 2), 0, size - sq))
        y = int(np.clip(size // 3 + vy * (i - t // 2), 0, size - sq))
        f[y : y + sq, x : x + sq] = tex
        frames.append(f)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def rates(fns: list, items: list, seconds: float, min_passes: int = 5) -> list[tuple[float, float, float]]:
    """Items per second of each ``fn(item)`` as ``(median, slowest, fastest)`` over passes. Interleaved per item:
    each item goes through every fn in turn (the starting fn rotating from pass to pass), so that all rows see the
    same machine load and the same warm caches; about ``seconds`` per fn, at least ``min_passes``, after one warm-up
    pass. A row whose work includes another's (codec motion = decode with vectors + tokens) can then only come out
    faster by less than the spread the figures show."""
    for fn in fns:
        for it in items:
            fn(it)
    totals: list[list[float]] = [[] for _ in fns]
    passes, t_start = 0, time.perf_counter()
    while passes < min_passes or time.perf_counter() - t_start < seconds * len(fns):
        spent = [0.0] * len(fns)
        for i, it in enumerate(items):
            for j in range(len(fns)):
                k = (j + i + passes) % len(fns)
                t0 = time.perf_counter()
                fns[k](it)
                spent[k] += time.perf_counter() - t0
        for k, t in enumerate(spent):
            totals[k].append(t)
        passes += 1
    return [(len(items) / statistics.median(t), len(items) / max(t), len(items) / min(t)) for t in totals]


def vectorised_block_matching(luma: torch.Tensor, block: int = 16, search: int = 7) -> torch.Tensor:
    """The same exhaustive search written the obvious vectorised way in torch (a fair speed reference): for every
    displacement, the shifted edge-extended previous frame, ``|cur - shifted|`` summed per block; the first minimum
    over the displacements in the documented tie order wins. ``[B, T, 1, H, W]`` -> ``[B, T-1, 2, H/b, W/b]``."""
    y = luma[:, :, 0].to(torch.float64)
    b, t, h, w = y.shape
    hb, wb, s = h // block, w // block, search
    n = b * (t - 1)
    prev = F.pad(y[:, :-1].reshape(n, 1, h, w), (s, s, s, s), mode="replicate")[:, 0]
    cur = y[:, 1:].reshape(n, h, w)[:, : hb * block, : wb * block]
    window = range(-s, s + 1)
    order = sorted(((dx, dy) for dy in window for dx in window), key=lambda d: (d[0] ** 2 + d[1] ** 2, d[1], d[0]))
    sads = []
    for dx, dy in order:
        shifted = prev[:, s - dy : s - dy + hb * block, s - dx : s - dx + wb * block]
        sads.append((cur - shifted).abs().reshape(n, hb, block, wb, block).sum((2, 4)))
    best = torch.stack(sads).argmin(0)  # the first minimum: the tie order
    d = torch.tensor(order, dtype=torch.float32)[best]  # [n, hb, wb, 2] = (dx, dy)
    return d.permute(0, 3, 1, 2).reshape(b, t - 1, 2, hb, wb)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--clips", type=int, default=6, help="distinct clips per size")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measured row")
    parser.add_argument("--dim", type=int, default=384, help="token width D")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--thread-type", default=None, help="decode_video thread_type (AUTO, FRAME, SLICE, NONE; default: its own)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, "
        f"load {os.getloadavg()[0]:.1f} | python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), PyAV {av.__version__}, FFmpeg {av.library_versions['libavcodec']}"
    )
    print(
        f"settings: {args.frames}-frame mpeg4 clips x {args.clips} per size, batch 1, D={args.dim}, tubelet 2x16x16, "
        f"motion: block 16, search 7, token 2 steps x 1x1 blocks, decode thread_type {args.thread_type or 'default'}, "
        f"~{args.seconds:.0f} s per row"
    )
    header = f"{'size':>7} {'pipeline':<18} {'clips/s':>9} {'ms/clip':>8} {'vs decode':>9}   (slowest-fastest pass)"
    print(header)
    print("-" * len(header))
    bm_rows = []
    for size in args.sizes:
        clips = [encode_video(synthetic_clip(args.frames, size, seed)) for seed in range(args.clips)]
        tubelets = VideoTubelets(img_size=size, num_frames=args.frames, embed_dim=args.dim).eval()
        bm_tok = MotionTokens(embed_dim=args.dim, patch_size=1, t_patch=2, img_size=size, num_frames=args.frames)
        codec_tok = MotionTokens(
            embed_dim=args.dim, patch_size=1, t_patch=2, source="codec", img_size=size, num_frames=args.frames
        )
        n, tt = args.frames, args.thread_type

        def decode(data, n=n, tt=tt):
            return decode_video(data, num_frames=n, thread_type=tt)

        def decode_mvs(data, n=n, tt=tt):
            return decode_video(data, num_frames=n, export_mvs=True, thread_type=tt)

        def with_tubelets(data, tok=tubelets, n=n, tt=tt):
            return tok(normalize_frames(decode_video(data, num_frames=n, thread_type=tt).frames))

        def with_bm(data, tok=bm_tok, n=n, tt=tt):
            return tok(normalize_frames(decode_video(data, num_frames=n, thread_type=tt).frames))

        def with_codec(data, tok=codec_tok, n=n, tt=tt):
            clip = decode_video(data, num_frames=n, export_mvs=True, thread_type=tt)
            return tok(motion=clip.motion[None])

        rows = [
            ("decode", decode),
            ("decode+mvs", decode_mvs),
            ("decode+tubelets", with_tubelets),
            ("decode+bm motion", with_bm),
            ("decode+codec mot", with_codec),
        ]
        with torch.inference_mode():
            measured = rates([fn for _, fn in rows], clips, args.seconds)
            base = measured[0][0]
            for (name, _), (r, lo, hi) in zip(rows, measured):
                print(f"{size:>4}px  {name:<18} {r:>9.1f} {1000 / r:>8.2f} {r / base:>9.2f}   ({lo:.0f}-{hi:.0f})")
            # block matching vs the per-block NumPy loop on the rounded luma of one decoded clip (integer SADs: the
            # two must agree exactly, ties included)
            x = luminance(decode_video(clips[0], num_frames=n).frames.permute(0, 3, 1, 2)[None]).round()[:, :, None]
            ours = block_matching(x)
            t_ref0 = time.perf_counter()
            ref = numpy_block_matching(x)
            t_ref = time.perf_counter() - t_ref0
            if not torch.equal(ours, torch.from_numpy(ref)):
                raise SystemExit(f"block_matching and the reference disagree at {size}px")
            if not torch.equal(ours, vectorised_block_matching(x)):
                raise SystemExit(f"block_matching and the vectorised reference disagree at {size}px")
            t_ours = best_time(lambda x=x: block_matching(x), 7)
            t_vec = best_time(lambda x=x: vectorised_block_matching(x), 7)
            bm_rows.append((size, x.shape[1] - 1, t_ours, t_vec, t_ref))
    print()
    print(
        f"{'size':>7} {'pairs':>5} {'block_matching ms':>18} {'vectorised torch ms':>20} {'ratio':>6} "
        f"{'NumPy loop ms':>14}"
    )
    for size, pairs, t_ours, t_vec, t_ref in bm_rows:
        print(
            f"{size:>4}px  {pairs:>5} {t_ours * 1000:>18.2f} {t_vec * 1000:>20.2f} {t_vec / t_ours:>5.1f}x "
            f"{t_ref * 1000:>14.1f}"
        )


if __name__ == "__main__":
    main()
