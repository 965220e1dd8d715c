"""`VectorQuantizer` (tokenizers_mm.vq) against vector-quantize-pytorch 1.32.0 `VectorQuantize`, the test oracle.

Input ``x [32, 256, 32]`` (8192 tokens), K = 1024 codes, Euclidean and cosine, fp32 on the CPU. The reference is set
up as in `tests/test_vq.py` (``rotation_trick=False``, ``kmeans_init=False``, ``threshold_ema_dead_code=0``, the same
decay / eps / commitment weight) and both start from the same codebook. Rows, per distance:

- ``eval``: forward in eval mode (the nearest-code search and the gather);
- ``train``: forward in training mode (the search, the commitment loss and the EMA update of the codebook);
- ``k-means init``: the first training forward with ``kmeans_init=True`` (10 Lloyd iterations; ours seeds with
  greedy k-means++, the reference samples the seeds uniformly), a one-off cost.

Each repeat times every row of both implementations in turn (interleaved, so both see the same load); medians are
printed, and ``ours / ref`` is our time over the reference's (< 1 = faster). Checks, on fresh copies: eval indices and
outputs equal; after one training step the indices, the loss and the three codebook buffers equal.
If vector-quantize-pytorch is not installed, the script says so and exits 0.

Usage: python bench/bench_vq.py [--batch 32] [--tokens 256] [--dim 32] [--codes 1024] [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch

from tokenizers_mm.vq import VectorQuantizer

DECAY, EPS, BETA = 0.99, 1e-5, 0.25


def make_ours(dim: int, codes: int, distance: str, kmeans_init: bool = False) -> VectorQuantizer:
    return VectorQuantizer(dim, codes, distance=distance, decay=DECAY, commitment_weight=BETA, eps=EPS,
                           kmeans_init=kmeans_init)  # fmt: skip


def make_ref(vqp, dim: int, codes: int, distance: str, kmeans_init: bool = False):
    return vqp.VectorQuantize(
        dim,
        codes,
        decay=DECAY,
        eps=EPS,
        commitment_weight=BETA,
        kmeans_init=kmeans_init,
        threshold_ema_dead_code=0,
        rotation_trick=False,
        use_cosine_sim=distance == "cosine",
    )


def make_pair(vqp, dim: int, codes: int, distance: str):
    """Ours and the reference with the same codebook and EMA buffers."""
    ours, ref = make_ours(dim, codes, distance), make_ref(vqp, dim, codes, distance)
    with torch.no_grad():
        ref._codebook.embed.copy_(ours.embed[None])
        ref._codebook.embed_avg.copy_(ours.embed_avg[None])
        ref._codebook.cluster_size.copy_(ours.cluster_size[None])
    return ours, ref


def check(vqp, x: torch.Tensor, dim: int, codes: int, distance: str) -> str:
    ours, ref = make_pair(vqp, dim, codes, distance)
    with torch.no_grad():
        q, idx, _ = ours.eval()(x)
        q_ref, idx_ref, _ = ref.eval()(x)
        same = (idx == idx_ref).float().mean().item()
        assert same == 1.0, f"{distance} eval: {same:.4%} of the indices equal"
        torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
        _, idx, loss = ours.train()(x)
        _, idx_ref, loss_ref = ref.train()(x)
    assert torch.equal(idx, idx_ref), f"{distance} train: indices differ"
    torch.testing.assert_close(loss, loss_ref)
    cb = ref._codebook
    for name, ref_buf in (("cluster_size", cb.cluster_size), ("embed_avg", cb.embed_avg), ("embed", cb.embed)):
        torch.testing.assert_close(getattr(ours, name), ref_buf[0], rtol=1e-5, atol=1e-6, msg=f"{distance} {name}")
    return f"{distance}: eval indices and outputs equal, one EMA step equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--codes", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    try:
        import vector_quantize_pytorch as vqp
    except ImportError as err:
        print(f"vector-quantize-pytorch is not installed ({err}): nothing to compare against; "
              "pip install vector-quantize-pytorch==1.32.0")  # fmt: skip
        sys.exit(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim)
    # clustered tokens for the k-means rows (as encoder features would be)
    centres = torch.randn(args.codes, args.dim) * 3.0
    clustered = centres[torch.randint(args.codes, (args.batch, args.tokens))] + 0.3 * x

    notes = [check(vqp, x, args.dim, args.codes, d) for d in ("euclidean", "cosine")]

    rows: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
    for distance in ("euclidean", "cosine"):
        ours, ref = make_pair(vqp, args.dim, args.codes, distance)
        ours_eval, ref_eval = copy.deepcopy(ours).eval(), copy.deepcopy(ref).eval()
        ours_train, ref_train = ours.train(), ref.train()
        rows[f"{distance} eval"] = (lambda m=ref_eval: m(x), lambda m=ours_eval: m(x))
        rows[f"{distance} train"] = (lambda m=ref_train: m(x), lambda m=ours_train: m(x))
        rows[f"{distance} k-means init"] = (
            lambda d=distance: make_ref(vqp, args.dim, args.codes, d, kmeans_init=True).train()(clustered),
            lambda d=distance: make_ours(args.dim, args.codes, d, kmeans_init=True).train()(clustered),
        )

    times: dict[tuple[str, int], list[float]] = {(name, who): [] for name in rows for who in (0, 1)}
    with torch.no_grad():
        for fns in rows.values():  # warm-up
            for fn in fns:
                fn()
        for _ in range(args.repeats):
            for name, fns in rows.items():
                for who, fn in enumerate(fns):
                    t0 = time.perf_counter()
                    fn()
                    times[name, who].append(time.perf_counter() - t0)

    print(
        f"torch {torch.__version__}, vector-quantize-pytorch {vqp_version()}, cpu, threads {torch.get_num_threads()}: "
        f"x [{args.batch}, {args.tokens}, {args.dim}], K = {args.codes}; median of {args.repeats} interleaved repeats"
    )
    print(f"{'row':<24} {'reference ms':>13} {'ours ms':>9} {'ours / ref':>11}")
    for name in rows:
        r, o = statistics.median(times[name, 0]), statistics.median(times[name, 1])
        print(f"{name:<24} {r * 1e3:>13.2f} {o * 1e3:>9.2f} {o / r:>11.2f}")
    print("checks: " + "; ".join(notes))


def vqp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vector-quantize-pytorch")
    except PackageNotFoundError:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    main()
