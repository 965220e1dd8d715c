"""Point grouping (FPS + kNN), batch 32 x 8192 points -> 512 groups x 32: ours vs the pure-torch fallback.

The reference is what Point-BERT / Point-MAE run without their CUDA extensions, written here from its description:
FPS as the per-iteration loop of the PointNet++ pure-torch port (a [B, P, 3] difference and sum, a boolean-mask update
of the running distance and a max per iteration; started at index 0 instead of a random point so that both FPS pick
the same samples), kNN as `knn_point`: `square_distance` (-2 c.x + |c|^2 + |x|^2 as a [B, n, P] matrix) and
`topk(k, largest=False, sorted=False)`. Ours: `farthest_point_sample` and `knn_group` (exact, nearest first).
Each repeat times every stage of both in turn (interleaved, so both see the same machine load); medians are printed.
Checks: both FPS give the same indices; our groups are the brute-force top-k of the exact squared distances (first
two clouds); the share of groups whose index set equals the reference's (its matmul-form distances round
differently, so near-ties can swap).
Goal: >= 5x for FPS + kNN.
The group encoder (`MiniPointNet`, forward + backward, `--encoder-groups` groups of k points at embed 384) runs its
1x1 convolutions as matmuls on points-as-rows; the reference is Point-BERT's own layout, the same modules applied as
Conv1d on [M, C, K]. Checks: equal outputs.
On a machine shared with other jobs, run it with OMP_WAIT_POLICY=PASSIVE: with OpenMP's default spin-waiting, every
parallel op waits for a descheduled thread, which slows loops of many ops (both FPS, our kNN) by up to 30x.
Usage: python bench/bench_points.py [--batch 32] [--points 8192] [--groups 512] [--k 32] [--repeats 7] [--threads N]
       [--encoder-groups 1024] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenizers_mm.points import MiniPointNet, farthest_point_sample, knn_group


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
    b, n, _ = centers.shape
    dist = -2 * torch.matmul(centers, xyz.permute(0, 2, 1))
    dist += torch.sum(centers**2, -1).view(b, n, 1)
    dist += torch.sum(xyz**2, -1).view(b, 1, -1)
    return dist.topk(k, dim=-1, largest=False, sorted=False).indices


def exact_sq_dist(xyz: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[B, n, P] squared distances in the expression `knn_group` ranks by."""
    d = (xyz[:, None, :, 0] - centers[:, :, None, 0]).square()
    d = d + (xyz[:, None, :, 1] - centers[:, :, None, 1]).square()
    return d + (xyz[:, None, :, 2] - centers[:, :, None, 2]).square()


def reference_group_encoder(enc: MiniPointNet, groups: torch.Tensor) -> torch.Tensor:
    """Point-BERT's layout: the Conv1d stacks on ``[M, C, K]``."""
    f = enc.first(groups.transpose(1, 2))
    f = enc.second(torch.cat([f.amax(dim=2, keepdim=True).expand_as(f), f], dim=1))
    return f.amax(dim=2)


def _fwd_bwd(fn, enc: MiniPointNet, groups: torch.Tensor) -> torch.Tensor:
    enc.zero_grad(set_to_none=True)
    out = fn(enc, groups)
    out.sum().backward()
    return out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--points", type=int, default=8192)
    parser.add_argument("--groups", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--encoder-groups", type=int, default=1024, help="groups through the group encoder")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    xyz = torch.rand(args.batch, args.points, 3, device=args.device)
    rows = torch.arange(args.batch, device=args.device)[:, None]
    centers = xyz[rows, farthest_point_sample(xyz, args.groups)]

    enc = MiniPointNet(3, 384).to(args.device)
    groups = torch.randn(args.encoder_groups, args.k, 3, device=args.device)
    stages = {
        "FPS": (lambda: reference_fps(xyz, args.groups), lambda: farthest_point_sample(xyz, args.groups)),
        "kNN": (lambda: reference_knn(xyz, centers, args.k), lambda: knn_group(xyz, centers, args.k)),
        "FPS + kNN": (
            lambda: reference_knn(xyz, xyz[rows, reference_fps(xyz, args.groups)], args.k),
            lambda: knn_group(xyz, xyz[rows, farthest_point_sample(xyz, args.groups)], args.k),
        ),
        "encoder": (
            lambda: _fwd_bwd(reference_group_encoder, enc, groups),
            lambda: _fwd_bwd(MiniPointNet.forward, enc, groups),
        ),
    }
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = {(name, who): [] for name in stages for who in (0, 1)}
    outputs = {}
    for name, fns in stages.items():  # warm-up, and the outputs to check
        for who, fn in enumerate(fns):
            outputs[name, who] = fn()
    for _ in range(args.repeats):
        for name, fns in stages.items():
            for who, fn in enumerate(fns):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name, who].append(time.perf_counter() - t0)

    assert torch.equal(outputs["FPS", 0], outputs["FPS", 1]), "the two FPS must agree"
    ours, ref = outputs["kNN", 1], outputs["kNN", 0]
    d = exact_sq_dist(xyz[:2], centers[:2])
    brute = d.topk(args.k, dim=-1, largest=False, sorted=True).values
    assert torch.equal(d.gather(-1, ours[:2]), brute), "kNN must be the brute-force top-k"
    same = (ours.sort(-1).values == ref.sort(-1).values).all(-1).float().mean().item()
    torch.testing.assert_close(outputs["encoder", 1], outputs["encoder", 0], rtol=1e-4, atol=1e-4)

    print(
        f"torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}: batch {args.batch} x "
        f"{args.points} points -> {args.groups} groups x {args.k}; median of {args.repeats} interleaved repeats"
    )
    print(f"{'stage':<12} {'reference ms':>13} {'ours ms':>9} {'speed-up':>9}")
    for name in stages:
        r, o = statistics.median(times[name, 0]), statistics.median(times[name, 1])
        print(f"{name:<12} {r * 1e3:>13.1f} {o * 1e3:>9.1f} {r / o:>8.2f}x")
    print(
        f"encoder: {args.encoder_groups} groups x {args.k} points, forward + backward. "
        "checks: FPS indices equal; kNN = brute-force top-k of the exact distances; encoder outputs equal; "
        f"{same:.2%} of groups have the reference's index set"
    )


if __name__ == "__main__":
    main()
