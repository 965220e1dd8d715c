"""Point grouping (FPS + kNN), batch 32 x 8192 points -> 512 groups x 32: ours vs the pure-torch fallback loop.

The reference is the per-iteration FPS loop of the common PointNet++ / Point-MAE pure-torch fallback (a [B, P, 3]
difference, a sum, and a boolean-mask update each iteration) followed by the square-distance + topk kNN, written
here from its description and measured in the same run. Goal: >= 5x for the whole grouping.
Usage: python bench/bench_points.py [--batch 32] [--points 8192] [--groups 512] [--k 32] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenizers_mm.points import farthest_point_sample, knn_group


def reference_fps(xyz: torch.Tensor, n: int) -> torch.Tensor:
    b, p, _ = xyz.shape
    centroids = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    distance = torch.ones(b, p, device=xyz.device) * 1e10
    farthest = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(n):
        centroids[:, i] = farthest
        centroid = xyz[rows, farthest, :].view(b, 1, 3)
        dist = torch.sum((xyz - centroid) ** 2, -1)
        closer = dist < distance
        distance[closer] = dist[closer]
        farthest = torch.max(distance, -1)[1]
    return centroids


def reference_knn(xyz: torch.Tensor, centers: torch.Tensor, k: int) -> torch.Tensor:
    dist = -2 * torch.matmul(centers, xyz.transpose(1, 2))
    dist += torch.sum(centers**2, -1)[:, :, None]
    dist += torch.sum(xyz**2, -1)[:, None, :]
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def _time(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--points", type=int, default=8192)
    parser.add_argument("--groups", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    xyz = torch.rand(args.batch, args.points, 3, device=args.device)
    rows = torch.arange(args.batch, device=args.device)[:, None]
    assert torch.equal(reference_fps(xyz, 64), farthest_point_sample(xyz, 64)), "the two FPS must agree"

    def ours_fps():
        return farthest_point_sample(xyz, args.groups)

    def ref_fps():
        return reference_fps(xyz, args.groups)

    centers = xyz[rows, ours_fps()]

    def ours_all():
        idx = farthest_point_sample(xyz, args.groups)
        return knn_group(xyz, xyz[rows, idx], args.k)

    def ref_all():
        idx = reference_fps(xyz, args.groups)
        return reference_knn(xyz, xyz[rows, idx], args.k)

    for fn in (ours_all, ref_all):
        fn()
    print(
        f"torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}: batch {args.batch} x "
        f"{args.points} points -> {args.groups} groups x {args.k}"
    )
    t_of, t_rf = _time(ours_fps, args.repeats, args.device), _time(ref_fps, args.repeats, args.device)
    t_ok = _time(lambda: knn_group(xyz, centers, args.k), args.repeats, args.device)
    t_rk = _time(lambda: reference_knn(xyz, centers, args.k), args.repeats, args.device)
    t_oa, t_ra = _time(ours_all, args.repeats, args.device), _time(ref_all, args.repeats, args.device)
    print(f"{'stage':<16} {'reference ms':>13} {'ours ms':>9} {'speed-up':>9}")
    for name, r, o in (("FPS", t_rf, t_of), ("kNN", t_rk, t_ok), ("FPS + kNN", t_ra, t_oa)):
        print(f"{name:<16} {r * 1e3:>13.1f} {o * 1e3:>9.1f} {r / o:>8.2f}x")


if __name__ == "__main__":
    main()
