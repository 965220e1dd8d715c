"""Point clouds -> group `Tokens` (Point-BERT / Point-MAE): farthest point sampling, kNN groups, mini-PointNet.

All of it is batched plain torch (no CUDA extension). FPS keeps one running distance per point, updated with
``torch.minimum`` over three coordinate planes, and finds its argmax blockwise; kNN is exact but never builds the
``[B, n, P]`` distance matrix (Morton-ordered blocks with bounding boxes, see `knn_group`). Both are several times
faster than the per-iteration FPS loop and the square-distance + topk kNN of the usual pure-torch fallback
(`bench/bench_points.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_input
from .registry import register_tokenizer
from .tokens import Tokens

__all__ = ["farthest_point_sample", "knn_group", "group_points", "centre_positions", "PointGroups"]


def _check_xyz(xyz: torch.Tensor, name: str = "xyz") -> None:
    if not isinstance(xyz, torch.Tensor) or xyz.dim() != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"{name} must be [B, P, 3], got {getattr(xyz, 'shape', type(xyz))}")
    if not xyz.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {xyz.dtype}")


def _check_counts(mask: torch.Tensor | None, num_points: int, need: int, what: str) -> None:
    counts = mask.sum(1) if mask is not None else torch.full((1,), num_points)
    smallest = int(counts.min())
    if smallest < need:
        raise ValueError(f"a point cloud has {smallest} real points, fewer than {what} = {need}")


_ARGMAX_BLOCK = 128  # FPS takes the farthest point per block of this many points, then the block


def farthest_point_sample(
    xyz: torch.Tensor, n: int, start: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of `n` farthest-point samples per cloud.

    Args:
        xyz: ``[B, P, 3]`` coordinates.
        n: samples per cloud.
        start: ``[B]`` index of the first sample (default 0, as the reference implementations; with a `mask`,
            the first real point).
        mask: ``[B, P]`` bool, True = real point; padded points are never sampled.
    Returns ``[B, n]`` long indices into ``P``. Of equally far points the first is taken (as ``argmax``).
    """
    _check_xyz(xyz)
    b, p, _ = xyz.shape
    if not 1 <= n <= p:
        raise ValueError(f"cannot sample n={n} points from clouds of {p} points")
    if mask is not None:
        if mask.shape != (b, p) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool [B, P] = [{b}, {p}] tensor, got {mask.dtype} {tuple(mask.shape)}")
        _check_counts(mask, p, n, "the number of samples n")
    dev = xyz.device
    if start is None:
        start = mask.float().argmax(1) if mask is not None else torch.zeros(b, dtype=torch.long, device=dev)
    start = start.to(device=dev, dtype=torch.long)
    # Three contiguous coordinate planes, padded to whole blocks. Each iteration: the squared distance of every point
    # to the newest sample, the running minimum, and its first argmax found blockwise (amax per block, argmax over
    # the block maxima, argmax inside that block), which is several times faster than one argmax over the row.
    s = _ARGMAX_BLOCK
    nblk = -(-p // s)
    pp = nblk * s
    planes = torch.zeros(3, b, pp, dtype=xyz.dtype, device=dev)
    planes[:, :, :p] = xyz.permute(2, 0, 1)
    distance = torch.full((b, pp), float("inf"), dtype=xyz.dtype, device=dev)
    distance[:, p:] = -1.0  # padding (and masked points) can never be the farthest point
    if mask is not None:
        distance[:, :p].masked_fill_(~mask, -1.0)
    flat, blocks = planes.view(3, b * pp), distance.view(b * nblk, s)
    first_block = torch.arange(b, device=dev) * nblk  # each cloud's first block in `blocks`
    farthest = start + first_block * s  # into the flattened planes
    chosen = [farthest]
    d3 = torch.empty_like(planes)
    d = torch.empty_like(distance)
    for _ in range(n - 1):
        c = flat.index_select(1, farthest)  # [3, B]
        torch.sub(planes, c[:, :, None], out=d3).square_()
        torch.add(d3[0], d3[1], out=d).add_(d3[2])
        torch.minimum(distance, d, out=distance)
        block = distance.view(b, nblk, s).amax(2).argmax(1).add_(first_block)
        farthest = torch.add(blocks.index_select(0, block).argmax(1), block, alpha=s)
        chosen.append(farthest)
    return torch.stack(chosen, 1).sub_(first_block[:, None] * s)


# kNN: exact, without the dense [B, n, P] distance matrix. Points are put in Morton (z-curve) order and cut into
# blocks of _BLOCK consecutive points, each cut again into sub-blocks of _SUB_BLOCK, all with their bounding boxes.
# Per centre:
#   1. t = the k-th smallest distance among the `_WINDOW * k` points around the centre's place in Morton order. These
#      are real points, so at least k points lie within t: t bounds the true k-th distance from above.
#   2. candidate blocks: those whose box comes within t of the centre (a vectorised [rows, blocks] test); then the
#      same test for the sub-blocks of the candidate blocks.
#   3. the distances of the candidate sub-blocks' points; those within t (about 2k per centre) are ranked by topk.
# Every distance here is the same float expression ((x-cx)^2 + (y-cy)^2) + (z-cz)^2 of the same values, and a box's
# distance is that expression on the box point nearest the centre. Float rounding is monotone, so no point computes
# closer than its box, and the window's points compute exactly t again: the result is the brute-force top-k of that
# expression (ties at the k-th distance may be broken either way). The Morton order only decides the amount of work.
_BLOCK = 64  # points per block (first box test)
_SUB_BLOCK = 8  # points per sub-block (second box test); divides _BLOCK
_SUB_SHIFT, _POINT_SHIFT = (_BLOCK // _SUB_BLOCK).bit_length() - 1, _SUB_BLOCK.bit_length() - 1  # powers of two
_WINDOW = 4  # window of _WINDOW * k points for the bound t
_SMALL = 4  # clouds of at most _SMALL windows of points are done by brute force (blocks would not save work)
_DENSE = 0.5  # so is a step where more than this share of (centre, block) pairs are candidates (duplicates)
_CHUNK_ROWS = 2048  # centres per step (fewer, bigger steps cost the same work and fewer thread wake-ups)
_CHUNK_POINTS = 1 << 25  # and at most this many (centre, point) pairs per step (the worst case, all candidates)


def _spread_bits(v: torch.Tensor) -> torch.Tensor:
    """10-bit integers -> the same bits at every third position (for Morton codes)."""
    v = (v | (v << 16)) & 0x030000FF
    v = (v | (v << 8)) & 0x0300F00F
    v = (v | (v << 4)) & 0x030C30C3
    return (v | (v << 2)) & 0x09249249


def _morton(q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """30-bit Morton codes of ``[..., 3]`` coordinates on the 1024^3 grid spanned from `lo` with `scale`."""
    g = ((q.float() - lo) * scale).clamp_(0, 1023).to(torch.int32)
    return (_spread_bits(g[..., 0]) << 2) | (_spread_bits(g[..., 1]) << 1) | _spread_bits(g[..., 2])


def _box_distance(c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Squared distance from centres `c` to boxes ``[lo, hi]`` (broadcast, coordinates first) in the point-distance
    expression; an empty box (lo = inf, hi = -inf) is at inf."""
    q = torch.clamp(c, lo, hi).sub_(c).square_()
    return q[0].add_(q[1]).add_(q[2])


def _knn_dense(xyz: torch.Tensor, centers: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """The same top-k by brute force over the ``[B, n, P]`` distances (for small clouds, degenerate ones, and on
    accelerators, which do that well)."""
    c = centers.to(xyz.dtype)
    d = (xyz[:, None, :, 0] - c[:, :, None, 0]).square_()
    d += (xyz[:, None, :, 1] - c[:, :, None, 1]).square_()
    d += (xyz[:, None, :, 2] - c[:, :, None, 2]).square_()
    if mask is not None:
        d.masked_fill_(~mask[:, None], float("inf"))
    return d.topk(k, dim=-1, largest=False, sorted=True).indices


def knn_group(xyz: torch.Tensor, centers: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `k` nearest points of each centre, nearest first.

    Exact: the top-k of the squared distances ``((x-cx)^2 + (y-cy)^2) + (z-cz)^2`` in the dtype of `xyz`, as brute
    force over all points would rank them (which of several points tied at the k-th distance is taken is unspecified).
    On the CPU it does not build the ``[B, n, P]`` distance matrix (see the comment above) unless the clouds are small
    (at most 16 * k points) or most points are near most centres; on other devices it does.

    Args:
        xyz: ``[B, P, 3]`` points; centers: ``[B, n, 3]``; mask: ``[B, P]`` (padded points are never chosen).
    Returns ``[B, n, k]`` long indices into ``P``.
    """
    _check_xyz(xyz)
    _check_xyz(centers, "centers")
    b, p, _ = xyz.shape
    if centers.shape[0] != b:
        raise ValueError(f"centers has batch {centers.shape[0]}, xyz has {b}")
    if not 1 <= k <= p:
        raise ValueError(f"cannot take k={k} neighbours from clouds of {p} points")
    if mask is not None:
        if mask.shape != (b, p) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool [B, P] = [{b}, {p}] tensor, got {mask.dtype} {tuple(mask.shape)}")
        _check_counts(mask, p, k, "group_size k")
    w = min(_WINDOW * k, p)
    if xyz.device.type != "cpu" or p <= _SMALL * w:
        return _knn_dense(xyz, centers, k, mask)
    n, dev, dt, inf = centers.shape[1], xyz.device, xyz.dtype, float("inf")
    out = torch.empty(b, n, k, dtype=torch.long, device=dev)
    if n == 0:
        return out
    nb = -(-p // _BLOCK)
    pp, subs, ns = nb * _BLOCK, _BLOCK // _SUB_BLOCK, nb * (_BLOCK // _SUB_BLOCK)

    # Morton order of the real points (padding last) and each centre's place in it
    if mask is None:
        lo, hi = xyz.float().amin(1, keepdim=True), xyz.float().amax(1, keepdim=True)
    else:
        lo = xyz.float().masked_fill(~mask[..., None], inf).amin(1, keepdim=True)
        hi = xyz.float().masked_fill(~mask[..., None], -inf).amax(1, keepdim=True)
    scale = 1023.0 / (hi - lo).amax(-1, keepdim=True).clamp_min(1e-30)
    code = _morton(xyz, lo, scale)
    if mask is not None:
        code.masked_fill_(~mask, 1 << 30)
    code, perm = code.sort(dim=1)
    place = torch.searchsorted(code, _morton(centers, lo, scale))  # [B, n]
    last = p - w if mask is None else (mask.sum(1, keepdim=True) - w).clamp_min(0)
    start = torch.minimum((place - w // 2).clamp_min(0), torch.as_tensor(last, device=dev))
    start = start + torch.arange(b, device=dev)[:, None] * pp  # into the flattened planes

    # sorted coordinate planes [3, B, nb * _BLOCK]; padding (and masked points) at +inf: their distances are inf
    planes = torch.full((3, b, pp), inf, dtype=dt, device=dev)
    planes[:, :, :p] = xyz.permute(2, 0, 1).gather(2, perm.expand(3, b, p))
    if mask is not None:
        planes[:, :, :p].masked_fill_(~mask.gather(1, perm), inf)
    sub = planes.view(3, b * ns, _SUB_BLOCK)
    sub_lo = sub.amin(-1)  # [3, B * ns]; an all-padding box gets lo = inf, hi = -inf: never a candidate
    sub_hi = sub.masked_fill(sub == inf, -inf).amax(-1) if pp != p or mask is not None else sub.amax(-1)
    box_lo, box_hi = sub_lo.view(3, b, nb, subs).amin(-1), sub_hi.view(3, b, nb, subs).amax(-1)
    flat = planes.view(3, b * pp)
    cpl = centers.to(dt).permute(2, 0, 1)  # [3, B, n]
    window, within = torch.arange(w, device=dev), torch.arange(subs, device=dev)
    # steps of whole clouds, or of part of one; fewer rows for big clouds, where a degenerate cloud (all its points
    # within t of every centre) makes every point a candidate
    rows = max(1, min(_CHUNK_ROWS, _CHUNK_POINTS // pp))
    rows_per_step, clouds_per_step = min(n, rows), max(1, rows // n)
    sub_boxes = torch.cat([sub_lo, sub_hi])  # [6, B * ns]
    # the original index of every slot of the padded Morton order (padding is never chosen)
    origin = torch.zeros(b, pp, dtype=torch.long, device=dev)
    origin[:, :p] = perm
    origin = origin.view(-1)
    for b0 in range(0, b, clouds_per_step):
        b1 = min(b0 + clouds_per_step, b)
        for r0 in range(0, n, rows_per_step):
            r1 = min(r0 + rows_per_step, n)
            cb, r = b1 - b0, r1 - r0
            c = cpl[:, b0:b1, r0:r1, None]  # [3, cb, r, 1]
            # 1. the bound t from the Morton window
            g = flat.index_select(1, (start[b0:b1, r0:r1, None] + window).view(-1)).view(3, cb, r, w)
            g = g.sub_(c).square_()
            t = g[0].add_(g[1]).add_(g[2]).topk(k, dim=-1, largest=False, sorted=False).values.amax(-1).view(-1)
            # 2. blocks, then their sub-blocks, whose boxes come within t (index arithmetic on flat nonzero positions)
            near = _box_distance(c, box_lo[:, b0:b1, None, :], box_hi[:, b0:b1, None, :]) <= t.view(cb, r, 1)
            hit = near.view(-1).nonzero().squeeze(1)  # (centre, block) pairs, ordered by centre
            if hit.numel() > near.numel() * _DENSE:  # most points near most centres (duplicates): brute force
                part = None if mask is None else mask[b0:b1]
                out[b0:b1, r0:r1] = _knn_dense(xyz[b0:b1], centers[b0:b1, r0:r1], k, part)
                continue
            row = hit.div(nb, rounding_mode="floor")  # centre within the step
            first_sub = (hit - row * nb + (row.div(r, rounding_mode="floor") + b0) * nb) * subs  # into B * ns
            cc = c.view(3, cb * r).index_select(1, row).unsqueeze(2)  # [3, pairs, 1]
            ids = first_sub[:, None] + within  # [pairs, subs]
            lo_hi = sub_boxes.index_select(1, ids.view(-1)).view(6, -1, subs)
            near = _box_distance(cc, lo_hi[:3], lo_hi[3:]) <= t.index_select(0, row).unsqueeze(1)
            hit = near.view(-1).nonzero().squeeze(1)
            pair = hit >> _SUB_SHIFT
            row, ids = row.index_select(0, pair), ids.view(-1).index_select(0, hit)
            # 3. their points' distances; keep those within t (at least k per centre, the window's among them)
            g = sub.index_select(1, ids).sub_(cc.index_select(1, pair)).square_()
            d = g[0].add_(g[1]).add_(g[2])  # [sub-blocks, _SUB_BLOCK]
            keep = (d <= t.index_select(0, row).unsqueeze(1)).view(-1).nonzero().squeeze(1)
            d = d.view(-1).index_select(0, keep)
            which = keep >> _POINT_SHIFT
            row = row.index_select(0, which)
            slot = (ids.index_select(0, which) << _POINT_SHIFT) | (keep & (_SUB_BLOCK - 1))  # into B * pp
            # 4. rank each centre's survivors: pad them to [rows, most] and topk
            counts = torch.bincount(row, minlength=cb * r)
            most = int(counts.max())
            first = (counts.cumsum(0) - counts).mul_(-1).add_(torch.arange(cb * r, device=dev) * most)
            at = first.index_select(0, row).add_(torch.arange(row.numel(), device=dev))
            dist = torch.full((cb * r * most,), inf, dtype=dt, device=dev).index_copy_(0, at, d)
            slots = torch.zeros(cb * r * most, dtype=torch.long, device=dev).index_copy_(0, at, slot)
            best = dist.view(cb * r, most).topk(k, dim=1, largest=False, sorted=True).indices
            best = slots.view(cb * r, most).gather(1, best).view(-1)
            out[b0:b1, r0:r1] = origin.index_select(0, best).view(cb, r, k)
    return out


def group_points(
    points: torch.Tensor,
    num_groups: int,
    group_size: int,
    mask: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FPS centres + kNN groups with coordinates relative to their centre.

    Args:
        points: ``[B, P, 3 + C]`` (xyz first, then C features).
    Returns ``(groups [B, G, K, 3 + C]`` with local xyz, ``centers [B, G, 3]``, ``center_idx [B, G])``.
    """
    if points.dim() != 3 or points.shape[-1] < 3:
        raise ValueError(f"points must be [B, P, 3 + C], got {tuple(points.shape)}")
    if not torch.isfinite(points).all():
        raise ValueError("points contain NaN or infinite values; drop or repair them before tokenizing")
    xyz = points[..., :3].contiguous()
    center_idx = farthest_point_sample(xyz, num_groups, start=start, mask=mask)
    b = points.shape[0]
    rows = torch.arange(b, device=points.device)[:, None]
    centers = xyz[rows, center_idx]  # [B, G, 3]
    idx = knn_group(xyz, centers, group_size, mask=mask)  # [B, G, K]
    groups = points[rows[:, :, None], idx]  # [B, G, K, 3 + C]
    local = groups[..., :3] - centers[:, :, None, :]
    return torch.cat([local, groups[..., 3:]], dim=-1), centers, center_idx


class MiniPointNet(nn.Module):
    """Point-BERT's group encoder: shared MLP (Conv1d-BN-ReLU-Conv1d), max-pool, concat the pooled feature to
    every point, a second shared MLP, max-pool. ``[M, K, C_in] -> [M, D]``."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.first = nn.Sequential(
            nn.Conv1d(in_channels, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, embed_dim, 1)
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        m, k, _ = groups.shape
        f = _pointwise(self.first, groups.reshape(m * k, -1)).view(m, k, -1)  # [M, K, 256]
        pooled = f.amax(dim=1, keepdim=True)
        f = torch.cat([pooled.expand_as(f), f], dim=-1).reshape(m * k, -1)  # [M*K, 512]
        return _pointwise(self.second, f).view(m, k, -1).amax(dim=1)


def _pointwise(layers: nn.Sequential, rows: torch.Tensor) -> torch.Tensor:
    """A Conv1d(kernel 1)-BN-ReLU stack on points as rows ``[N, C]``: each convolution as one matmul with its own
    weight, BatchNorm1d over the same N points as in the ``[M, C, K]`` layout. The modules (and checkpoints) stay
    Point-BERT's; oneDNN's 1x1 convolution is 3-4x slower than the matmul on CPU (``bench/bench_points.py``)."""
    for layer in layers:
        if isinstance(layer, nn.Conv1d):
            rows = F.linear(rows, layer.weight.squeeze(-1), layer.bias)
        else:
            rows = layer(rows)
    return rows


def centre_positions(pos_mlp: nn.Module, cls_pos: torch.Tensor | None, tokens: Tokens) -> torch.Tensor:
    """``pos_mlp`` over the group centres in ``tokens.pos``, with ``cls_pos`` for the prefix token. ``[B, N, D]``."""
    pos = pos_mlp(tokens.pos[:, tokens.num_prefix :])
    if tokens.num_prefix:
        if cls_pos is None:
            raise ValueError("tokens have a prefix token but no learned position was given for it")
        pos = torch.cat([cls_pos.expand(pos.shape[0], -1, -1), pos], dim=1)
    return pos


@register_tokenizer("points")
class PointGroups(nn.Module):
    """Point-BERT / Point-MAE tokenizer: FPS `num_groups` centres, kNN `group_size` neighbours, local
    coordinates, mini-PointNet per group, centre-MLP position embeddings.

    Args:
        num_groups: tokens per cloud (64 in Point-BERT/Point-MAE for 1024 points).
        group_size: neighbours per group (32).
        embed_dim: token width.
        in_channels: per-point channels (3 = xyz; more for xyz + colour/normal features).
        class_token: prepend a learned cls token (with its own learned position).
        add_pos: add the centre-MLP positions to the tokens; False leaves them to a backbone that adds
            `position_embedding(tokens)` at every block input (Point-BERT).

    Input ``points [B, P, in_channels]`` (and optional ``mask [B, P]``, True = real point, for clouds of different
    sizes padded to P). Output `Tokens`: ``x [B, (1 +) G, D]``, ``pos`` = group centres ``[B, (1 +) G, 3]`` (the cls
    token at the origin), ``modality="points"``. Clouds with fewer real points than `num_groups` or `group_size`, and
    coordinates that are not finite, are errors.
    """

    def __init__(
        self,
        num_groups: int = 64,
        group_size: int = 32,
        embed_dim: int = 384,
        in_channels: int = 3,
        class_token: bool = True,
        add_pos: bool = True,
    ):
        super().__init__()
        if in_channels < 3:
            raise ValueError(f"in_channels must be >= 3 (xyz first), got {in_channels}")
        self.num_groups, self.group_size, self.embed_dim = num_groups, group_size, embed_dim
        self.in_channels, self.add_pos = in_channels, add_pos
        self.encoder = MiniPointNet(in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        # positions live here only when added here; a backbone that adds them at every block owns its own
        self.pos_mlp = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, embed_dim)) if add_pos else None
        self.cls_pos = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02) if class_token and add_pos else None

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token is not None)

    def position_embedding(self, tokens: Tokens) -> torch.Tensor:
        """Centre-MLP positions for every token ``[B, N, D]`` (the cls token gets its learned position)."""
        if self.pos_mlp is None:
            raise ValueError("this tokenizer was built with add_pos=False: its backbone owns the positions")
        return centre_positions(self.pos_mlp, self.cls_pos, tokens)

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> Tokens:
        layout = f"points [B, P, {self.in_channels}]"
        # any float dtype is cast to the weights'; NaN / inf are refused by `group_points` (no FPS through them)
        points = check_input(
            points, "points", layout, ndim=3, dtype=self.encoder.first[0].weight.dtype, allow_nonfinite=True
        )
        if points.shape[-1] != self.in_channels:
            raise ValueError(f"points expects {layout}, got shape {tuple(points.shape)}")
        need = max(self.num_groups, self.group_size)
        real = int(mask.sum(1).min()) if mask is not None else points.shape[1]
        if real < need:
            raise ValueError(
                f"a point cloud has {real} real points, fewer than the {need} this tokenizer needs "
                f"(num_groups={self.num_groups}, group_size={self.group_size})"
            )
        groups, centers, _ = group_points(points, self.num_groups, self.group_size, mask=mask)
        b, g, k, c = groups.shape
        x = self.encoder(groups.reshape(b * g, k, c)).reshape(b, g, self.embed_dim)
        pos = centers
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
            pos = torch.cat([torch.zeros(b, 1, 3, device=pos.device, dtype=pos.dtype), pos], dim=1)
        tokens = Tokens(x=x, pos=pos, grid=None, num_prefix=self.num_prefix_tokens, modality="points")
        if self.add_pos:
            tokens = tokens.with_x(tokens.x + self.position_embedding(tokens))
        return tokens
