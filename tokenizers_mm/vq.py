"""`VectorQuantizer`: a vector-quantisation bottleneck with an EMA codebook (VQ-VAE / SoundStream / Video-LaVIT style).

Each token of ``x [B, N, D]`` is replaced by its nearest code of a ``[K, D]`` codebook, by Euclidean distance or (with
``distance="cosine"``) by cosine similarity between the l2-normalised token and l2-normalised codes. Gradients pass
straight through the quantiser to the input; the codebook gets no gradient at all: in training mode it follows the
exponential moving average of the tokens assigned to each code (van den Oord et al. 2017, appendix A.1):

    cluster_size <- lerp(cluster_size, n_k, 1 - decay)        n_k   = number of real tokens assigned to code k
    embed_avg    <- lerp(embed_avg, s_k, 1 - decay)           s_k   = sum of those tokens
    codebook     =  embed_avg / smoothed(cluster_size)        (Laplace smoothing with `eps`; re-normalised for cosine)

This is the update of vector-quantize-pytorch 1.32.0's ``VectorQuantize`` (``rotation_trick=False``), which the tests
use as the oracle: ``cluster_size`` starts at ones and ``embed_avg`` at the codebook, the assignment and the returned
codes come from the codebook *before* the step's update, and with cosine distance the returned codes are the unit-norm
codes (the straight-through gradient then flows through the input's normalisation). Differences, all deliberate:

- no einops / einx; one codebook, no heads, no projections. Under torch.distributed the EMA statistics are summed over
  the ranks before the update (as the reference's ``sync_codebook``), and the k-means init and dead-code restarts are
  rank 0's, broadcast, so every rank holds the same codebook;
- padded tokens (``mask`` False) get index `PAD_INDEX` (-1) and a zero output, as in the reference, and never touch the
  statistics; a batch with no real token leaves the EMA buffers unchanged (the reference decays them toward zero);
- the commitment loss is also computed in eval mode (the reference returns 0 there), for validation curves, and with
  cosine distance it always compares the *normalised* input with its code (the reference switches to the raw input
  when a mask is given);
- k-means initialisation seeds with greedy k-means++ (D^2 sampling) instead of uniform sampling, so well-separated
  clusters each get their own code, and keeps the k-means means as the codebook (the reference turns a code whose
  cluster came out empty into a zero vector);
- ``commitment_weight`` defaults to 0.25 (the VQ-VAE paper's beta) and ``decay`` to 0.99; the reference's defaults are
  1.0 and 0.8.

Logging: `VectorQuantizer.usage` gives the share of codes used by a batch, the perplexity of its code histogram and
the number of codes whose EMA cluster size has fallen below a threshold (dead codes).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checks import check_input, count_nonfinite

__all__ = ["PAD_INDEX", "DISTANCES", "Distance", "CodebookUsage", "VectorQuantizer", "code_perplexity"]

Distance = Literal["euclidean", "cosine"]
DISTANCES: tuple[str, ...] = get_args(Distance)

PAD_INDEX = -1
"""The index `VectorQuantizer.forward` returns at padded positions; `VectorQuantizer.decode` maps it to zeros."""

_NORM_EPS = 1e-6  # l2 normalisation floor, as the reference's ``l2norm``
_SCORE_BLOCK = 1 << 22  # score-matrix entries per block of rows in the nearest-code search (16 MiB of float32)


class CodebookUsage(NamedTuple):
    """Codebook statistics for logging (0-dim tensors on the codebook's device; ``float(...)`` them to log).

    usage: share of the K codes that at least one real token of the batch was assigned to, in ``[0, 1]``.
    perplexity: ``exp(entropy)`` of the batch's code histogram over real tokens, in ``[1, K]`` (K = all codes used
        equally often; 1 for a batch without real tokens).
    used: number of codes used by the batch (long).
    dead: number of codes whose EMA cluster size is below the dead threshold (long), whatever the batch.
    """

    usage: torch.Tensor
    perplexity: torch.Tensor
    used: torch.Tensor
    dead: torch.Tensor


def code_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of a code histogram ``counts [K]`` (0-dim; 1 = one code used, K = all used evenly)."""
    p = counts / counts.sum().clamp(min=1.0)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=-1, eps=_NORM_EPS)


def _nearest(flat: torch.Tensor, codebook: torch.Tensor, cosine: bool) -> torch.Tensor:
    """``[M]`` index of the nearest row of ``codebook [K, D]`` for each row of ``flat [M, D]``.

    Euclidean: the argmax of ``2 x.c - |c|^2`` (``|x|^2`` is the same for every code); cosine: the argmax of ``x.c``
    (both already unit-norm). Of equally near codes the first is taken. The ``[M, K]`` scores are built in blocks of
    rows so that large batches do not allocate ``M * K`` floats at once.
    """
    m, k = flat.shape[0], codebook.shape[0]
    sq = None if cosine else codebook.square().sum(dim=1)
    rows = max(1, _SCORE_BLOCK // max(k, 1))
    out = []
    for start in range(0, m, rows):
        block = flat[start : start + rows]
        if cosine:
            scores = block @ codebook.T
        else:
            scores = torch.addmm(sq, block, codebook.T, beta=-1.0, alpha=2.0)
        out.append(scores.argmax(dim=1))
    return out[0] if len(out) == 1 else torch.cat(out)


def _laplace_smoothed(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """``cluster_size`` with Laplace smoothing, rescaled to the same total (never zero for ``eps > 0``)."""
    total = cluster_size.sum()
    return (cluster_size + eps) / (total + cluster_size.numel() * eps) * total


def _kmeans(samples: torch.Tensor, k: int, iters: int, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``samples [M, D]`` (unit-norm rows for ``cosine``: spherical k-means) into `k` means.

    Seeding is greedy k-means++ (as scikit-learn's: ``2 + log k`` candidates drawn with probability proportional to
    their squared distance to the nearest seed so far, from the global torch RNG; the one that lowers the total
    squared distance most becomes the next seed), then `iters` Lloyd iterations; a cluster that comes out empty keeps
    its previous mean. With fewer distinct samples than `k`, seeds repeat. Returns ``(means [k, D], counts [k])``: the
    counts of the final assignment to the returned means.
    """
    m, d = samples.shape
    trials = 2 + int(math.log(k))
    sq_norms = samples.square().sum(dim=1)
    means = samples.new_empty(k, d)
    first = int(torch.randint(m, (1,), device=samples.device))
    means[0] = samples[first]
    d2 = (sq_norms - 2.0 * (samples @ means[0]) + sq_norms[first]).clamp(min=0)
    for i in range(1, k):
        # the tiny floor makes the draw uniform once every sample coincides with a seed (all d2 == 0)
        cand = torch.multinomial(d2 + torch.finfo(d2.dtype).tiny, trials, replacement=True)
        cand_d2 = torch.addmm(sq_norms[None] + sq_norms[cand, None], samples[cand], samples.T, alpha=-2.0)
        cand_d2 = torch.minimum(d2[None], cand_d2.clamp(min=0))
        best = cand_d2.sum(dim=1).argmin()
        means[i] = samples[cand[best]]
        d2 = cand_d2[best]
    for _ in range(iters):
        idx = _nearest(samples, means, cosine)
        counts = torch.bincount(idx, minlength=k).to(samples.dtype)
        sums = samples.new_zeros(k, d).index_add_(0, idx, samples)
        new = sums / counts.clamp(min=1.0)[:, None]
        if cosine:
            new = _normalize(new)
        means = torch.where(counts[:, None] > 0, new, means)
    counts = torch.bincount(_nearest(samples, means, cosine), minlength=k).to(samples.dtype)
    return means, counts


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantisation with an EMA codebook, straight-through gradients and a commitment loss.

    Args:
        dim: D, the token width.
        codebook_size: K, the number of codes.
        distance: ``"euclidean"`` (nearest by L2 distance) or ``"cosine"`` (tokens and codes l2-normalised, nearest by
            dot product; the outputs are unit-norm codes).
        decay: EMA decay of the codebook statistics, in ``[0, 1]`` (1 stops the EMA; a pending k-means init and
            dead-code restarts still write the codebook).
        commitment_weight: weight of the commitment loss ``MSE(x, sg[q])`` (beta of VQ-VAE). The default 0.25 is the
            VQ-VAE paper's value (which it found robust from 0.1 to 2.0); vector-quantize-pytorch defaults to 1.0.
        kmeans_init: initialise the codebook by k-means (greedy k-means++ seeds, `kmeans_iters` Lloyd iterations;
            spherical for cosine) on the real tokens of the first batch seen in training mode, instead of the random
            init (a one-off cost of about K sequential seeding steps).
        kmeans_iters: Lloyd iterations of that k-means.
        dead_code_threshold: when > 0, after each training step every code whose EMA cluster size is below it is
            replaced by a random real token of the batch (its cluster size reset to the threshold, its ``embed_avg``
            to the token times the threshold), as vector-quantize-pytorch's ``threshold_ema_dead_code``. 0 = never.
        eps: Laplace-smoothing constant of the cluster sizes (> 0).

    Buffers (all in the state dict): ``embed [K, D]`` the codebook, ``cluster_size [K]`` and ``embed_avg [K, D]``
    the EMA statistics (``embed == embed_avg / smoothed(cluster_size)``, re-normalised for cosine), ``initted``
    (False until the k-means init has run). Without `kmeans_init` the codebook starts standard normal (unit rows for
    cosine), ``cluster_size`` at ones and ``embed_avg`` at the codebook. Randomness (init, k-means seeds, dead-code
    replacements) comes from the global torch RNG, so ``torch.manual_seed`` makes it reproducible.

    Distances are computed in the buffers' dtype (float32 by default) whatever the input's; the output has the
    input's dtype.
    """

    embed: torch.Tensor
    cluster_size: torch.Tensor
    embed_avg: torch.Tensor
    initted: torch.Tensor

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        distance: Distance = "euclidean",
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if distance not in DISTANCES:
            raise ValueError(f"{name}: unknown distance {distance!r}; expected one of {DISTANCES}")
        for what, value in (("dim", dim), ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {what} must be an integer >= 1, got {value!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"{name}: decay must be in [0, 1], got {decay}")
        if not (math.isfinite(commitment_weight) and commitment_weight >= 0):
            raise ValueError(f"{name}: commitment_weight must be finite and >= 0, got {commitment_weight}")
        if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
            raise ValueError(f"{name}: kmeans_iters must be an integer >= 0, got {kmeans_iters!r}")
        if not (math.isfinite(dead_code_threshold) and dead_code_threshold >= 0):
            raise ValueError(f"{name}: dead_code_threshold must be finite and >= 0, got {dead_code_threshold}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"{name}: eps must be finite and > 0, got {eps}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.distance: Distance = distance
        self.decay = float(decay)
        self.commitment_weight = float(commitment_weight)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = float(dead_code_threshold)
        self.eps = float(eps)

        embed = torch.randn(codebook_size, dim)
        if self.cosine:
            embed = _normalize(embed)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @property
    def cosine(self) -> bool:
        return self.distance == "cosine"

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, distance={self.distance!r}, decay={self.decay}, "
            f"commitment_weight={self.commitment_weight}, kmeans_init={self.kmeans_init}, "
            f"dead_code_threshold={self.dead_code_threshold}"
        )

    # ------------------------------------------------------------------ the codebook
    @property
    def codebook(self) -> torch.Tensor:
        """``[K, D]`` the codebook (the ``embed`` buffer; assign to this property to replace it)."""
        return self.embed

    @codebook.setter
    def codebook(self, value: torch.Tensor) -> None:
        """Copy ``value [K, D]`` in (l2-normalised for cosine) and set ``embed_avg`` to match the current cluster
        sizes, so that the EMA continues from it; marks the codebook as initialised (no k-means init afterwards)."""
        name = f"{type(self).__name__}.codebook"
        want = (self.codebook_size, self.dim)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be set to a tensor [K, D] = {list(want)}, got {type(value).__name__}")
        if tuple(value.shape) != want:
            raise ValueError(f"{name} must be set to a [K, D] = {list(want)} tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be set to a floating-point tensor, got {value.dtype}")
        bad = count_nonfinite(value)
        if bad:
            raise ValueError(f"{name}: the new codebook holds {bad} NaN or infinite value(s)")
        with torch.no_grad():
            new = value.detach().to(self.embed)
            if self.cosine:
                new = _normalize(new)
            self.embed.copy_(new)
            self.embed_avg.copy_(new * _laplace_smoothed(self.cluster_size, self.eps)[:, None])
            self.initted.fill_(True)

    # ------------------------------------------------------------------ checks
    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        layout = f"x [B, N, D={self.dim}]"
        x = check_input(x, name, layout, ndim=3, allow_nonfinite=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"{name}(dim={self.dim}) expects {layout}, got shape {tuple(x.shape)} (D={x.shape[-1]})")
        return x

    def _check_mask(self, mask: torch.Tensor | None, b: int, n: int, what: str) -> torch.Tensor | None:
        if mask is None:
            return None
        name = type(self).__name__
        if not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"{name}: mask must be a bool tensor [B, N] = [{b}, {n}] or None, got {type(mask).__name__}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(f"{name}: mask must have dtype torch.bool (True = real token), got {mask.dtype}")
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"{name}: mask must be [B, N] = [{b}, {n}] to match {what}, got {tuple(mask.shape)}")
        return mask

    def _check_indices(self, indices: torch.Tensor, where: str) -> None:
        name = f"{type(self).__name__}.{where}"
        k = self.codebook_size
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"{name} expects a long tensor of code indices [B, N], got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"{name} expects integer code indices [B, N], got {indices.dtype}")
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < PAD_INDEX or hi >= k:
                raise ValueError(
                    f"{name} expects code indices in [0, {k}) (or {PAD_INDEX} for padding), got values in [{lo}, {hi}]"
                )

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``x [B, N, D]``; ``mask [B, N]`` bool (True = real token) or None (all real).

        Returns ``(quantized [B, N, D], indices [B, N] long, loss [])``:

        - ``quantized``: the nearest codes (unit-norm for cosine), in the input's dtype, with the straight-through
          gradient ``x + (q - x).detach()`` (``x`` l2-normalised first for cosine); zeros at padded positions;
        - ``indices``: the codes' indices, `PAD_INDEX` (-1) at padded positions;
        - ``loss``: ``commitment_weight * mean((x - sg[q])^2)`` over the real positions and the D channels (0 when
          there is none), with a gradient to ``x`` only.

        In training mode the step also runs the k-means init (first batch, if `kmeans_init`), the EMA update of the
        codebook from the real tokens (after the assignment: the outputs use the codebook as it was before the
        step) and the dead-code replacement.

        Autocast is switched off inside: distances, k-means and the EMA run in the buffers' dtype (under bf16
        autocast the ``2 x.c - |c|^2`` scores cancel badly and pick other codes).
        """
        with torch.autocast(device_type=x.device.type if isinstance(x, torch.Tensor) else "cpu", enabled=False):
            return self._forward(x, mask)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self._check_x(x)
        b, n, d = x.shape
        mask = self._check_mask(mask, b, n, f"x {tuple(x.shape)}")
        xf = x.to(self.embed.dtype)
        if mask is not None:
            xf = xf.masked_fill(~mask[..., None], 0.0)
        if not torch.compiler.is_compiling():
            bad = count_nonfinite(xf)
            if bad:
                where = "real positions of x" if mask is not None else "x"
                raise ValueError(
                    f"{type(self).__name__}: the {where} hold {bad} NaN or infinite value(s) of {b * n * d} entries; "
                    "expected finite values"
                )
        if self.cosine:
            xf = _normalize(xf)
        flat = xf.reshape(b * n, d)
        weight = None if mask is None else mask.reshape(b * n).to(flat.dtype)

        if self.training and self.kmeans_init and not bool(self.initted):
            self._init_by_kmeans(flat.detach(), weight)

        with torch.no_grad():
            idx = _nearest(flat.detach(), self.embed, self.cosine)
            q = F.embedding(idx, self.embed).view(b, n, d)  # a copy: the EMA update below does not change it
        if self.training:
            self._ema_update(flat.detach(), idx, weight)
            self._expire_dead_codes(flat.detach(), weight)

        sq_err = (xf - q).square()
        if mask is None:
            commit = sq_err.mean()
        else:
            commit = (sq_err * mask[..., None]).sum() / (mask.sum() * d).clamp(min=1)
        loss = self.commitment_weight * commit

        out = xf + (q - xf).detach() if xf.requires_grad else q
        indices = idx.view(b, n)
        if mask is not None:
            out = out.masked_fill(~mask[..., None], 0.0)
            indices = indices.masked_fill(~mask, PAD_INDEX)
        return out.to(x.dtype), indices, loss

    # ------------------------------------------------------------------ codebook updates (training mode)
    @torch.no_grad()
    def _refresh_codebook(self) -> None:
        embed = self.embed_avg / _laplace_smoothed(self.cluster_size, self.eps)[:, None]
        if self.cosine:
            embed = _normalize(embed)
        self.embed.copy_(embed)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor | None) -> None:
        k = self.codebook_size
        if weight is None:
            counts = torch.bincount(idx, minlength=k).to(flat.dtype)
            sums = flat.new_zeros(k, self.dim).index_add_(0, idx, flat)
            rate: float | torch.Tensor = 1.0 - self.decay
        else:
            counts = flat.new_zeros(k).index_add_(0, idx, weight)
            sums = flat.new_zeros(k, self.dim).index_add_(0, idx, flat * weight[:, None])
            # no real token: leave the statistics as they are (without a host sync)
            rate = (weight.sum() > 0).to(flat.dtype) * (1.0 - self.decay)
        if _distributed():  # every rank applies the statistics of the whole global batch
            dist.all_reduce(counts)
            dist.all_reduce(sums)
            if isinstance(rate, torch.Tensor):
                dist.all_reduce(rate, op=dist.ReduceOp.MAX)
        self.cluster_size.lerp_(counts, rate)
        self.embed_avg.lerp_(sums, rate)
        self._refresh_codebook()

    @torch.no_grad()
    def _real_rows(self, flat: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return flat if weight is None else flat[weight > 0]

    @torch.no_grad()
    def _init_by_kmeans(self, flat: torch.Tensor, weight: torch.Tensor | None) -> None:
        samples = self._real_rows(flat, weight)
        if samples.shape[0] > 0:  # else no real token yet: initialise on a later batch
            means, counts = _kmeans(samples, self.codebook_size, self.kmeans_iters, self.cosine)
            self.cluster_size.copy_(counts)
            self.embed.copy_(means)
            self.embed_avg.copy_(means * _laplace_smoothed(self.cluster_size, self.eps)[:, None])
            self.initted.fill_(True)
        self._broadcast_state()  # rank 0's init is every rank's

    @torch.no_grad()
    def _expire_dead_codes(self, flat: torch.Tensor, weight: torch.Tensor | None) -> None:
        threshold = self.dead_code_threshold
        if threshold <= 0:
            return
        dead = self.cluster_size < threshold
        if not bool(dead.any()):
            return
        samples = self._real_rows(flat, weight)
        num_samples = samples.shape[0]
        if num_samples > 0:
            dead_idx = dead.nonzero().squeeze(1)
            if dead_idx.numel() > num_samples:  # replace a random subset now, the rest on later steps
                dead_idx = dead_idx[torch.randperm(dead_idx.numel(), device=dead_idx.device)[:num_samples]]
            new = samples[torch.randperm(num_samples, device=samples.device)[: dead_idx.numel()]]
            self.embed[dead_idx] = new
            self.cluster_size[dead_idx] = threshold
            self.embed_avg[dead_idx] = new * threshold
        self._broadcast_state()  # the synced statistics make every rank get here; rank 0's draws win

    def _broadcast_state(self) -> None:
        if _distributed():
            for buf in (self.embed, self.cluster_size, self.embed_avg, self.initted):
                dist.broadcast(buf, src=0)

    # ------------------------------------------------------------------ decoding and statistics
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [B, N]`` (any integer dtype; `PAD_INDEX` allowed) -> the codes ``[B, N, D]`` (zeros at
        `PAD_INDEX`), in the codebook's dtype. Any other index outside ``[0, K)`` is an error."""
        self._check_indices(indices, "decode")
        if indices.dim() != 2:
            raise ValueError(f"{type(self).__name__}.decode expects indices [B, N], got shape {tuple(indices.shape)}")
        indices = indices.long()
        pad = indices == PAD_INDEX
        codes = F.embedding(indices.clamp(min=0), self.embed)
        return codes.masked_fill(pad[..., None], 0.0)

    @torch.no_grad()
    def num_dead_codes(self, threshold: float | None = None) -> torch.Tensor:
        """The number of codes (long, 0-dim) whose EMA cluster size is below `threshold` (default:
        `dead_code_threshold` when it is > 0, else 1.0, i.e. fewer than one token per batch on average)."""
        if threshold is None:
            threshold = self.dead_code_threshold if self.dead_code_threshold > 0 else 1.0
        return (self.cluster_size < threshold).sum()

    @torch.no_grad()
    def usage(
        self, indices: torch.Tensor, mask: torch.Tensor | None = None, *, dead_threshold: float | None = None
    ) -> CodebookUsage:
        """Usage statistics of the codes ``indices [B, N]`` returned by `forward` (its `PAD_INDEX` positions and
        those where ``mask [B, N]`` is False are left out) and the current dead-code count (see `num_dead_codes`).
        """
        self._check_indices(indices, "usage")
        if indices.dim() != 2:
            raise ValueError(f"{type(self).__name__}.usage expects indices [B, N], got shape {tuple(indices.shape)}")
        mask = self._check_mask(mask, *indices.shape, f"indices {tuple(indices.shape)}")
        real = indices != PAD_INDEX
        if mask is not None:
            real = real & mask.to(real.device)
        counts = self.cluster_size.new_zeros(self.codebook_size)
        counts.index_add_(0, indices.reshape(-1).clamp(min=0).to(counts.device), real.reshape(-1).to(counts))
        used = (counts > 0).sum()
        return CodebookUsage(
            usage=used.to(counts.dtype) / self.codebook_size,
            perplexity=code_perplexity(counts),
            used=used,
            dead=self.num_dead_codes(dead_threshold),
        )
