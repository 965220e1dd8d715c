"""Point clouds -> group `Tokens` (Point-BERT / Point-MAE): farthest point sampling, kNN groups, mini-PointNet.

All of it is batched plain torch (no CUDA extension): FPS keeps one running distance per point and updates it with
``torch.minimum`` over three coordinate planes, which is several times faster than the per-iteration masked update
of the usual pure-torch fallback (`bench/bench_points.py`).
"""

from __future__ import annotations

import torch
from torch import nn

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
    Returns ``[B, n]`` long indices into ``P``.
    """
    _check_xyz(xyz)
    b, p, _ = xyz.shape
    if not 1 <= n <= p:
        raise ValueError(f"cannot sample n={n} points from clouds of {p} points")
    if mask is not None:
        if mask.shape != (b, p) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool [B, P] = [{b}, {p}] tensor, got {mask.dtype} {tuple(mask.shape)}")
        _check_counts(mask, p, n, "the number of samples n")
    if start is None:
        start = mask.float().argmax(1) if mask is not None else torch.zeros(b, dtype=torch.long, device=xyz.device)
    start = start.to(device=xyz.device, dtype=torch.long)
    planes = xyz.permute(2, 0, 1).contiguous()  # [3, B, P]: three contiguous coordinate planes
    x, y, z = planes[0], planes[1], planes[2]
    distance = torch.full((b, p), float("inf"), device=xyz.device, dtype=xyz.dtype)
    if mask is not None:
        distance.masked_fill_(~mask, -1.0)  # padding can never be the farthest point
    out = torch.empty(b, n, dtype=torch.long, device=xyz.device)
    farthest = start
    rows = torch.arange(b, device=xyz.device)
    d = torch.empty_like(distance)
    tmp = torch.empty_like(distance)
    for i in range(n):
        out[:, i] = farthest
        c = planes[:, rows, farthest]  # [3, B]
        torch.sub(x, c[0, :, None], out=d).square_()
        torch.sub(y, c[1, :, None], out=tmp).square_()
        d.add_(tmp)
        torch.sub(z, c[2, :, None], out=tmp).square_()
        d.add_(tmp)
        torch.minimum(distance, d, out=distance)
        farthest = distance.argmax(1)
    return out


def knn_group(xyz: torch.Tensor, centers: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `k` nearest points of each centre, nearest first.

    Args:
        xyz: ``[B, P, 3]`` points; centers: ``[B, n, 3]``; mask: ``[B, P]`` (padded points are never chosen).
    Returns ``[B, n, k]`` long indices into ``P``.
    """
    _check_xyz(xyz)
    _check_xyz(centers, "centers")
    if not 1 <= k <= xyz.shape[1]:
        raise ValueError(f"cannot take k={k} neighbours from clouds of {xyz.shape[1]} points")
    if mask is not None:
        _check_counts(mask, xyz.shape[1], k, "group_size k")
    # squared distances through one batched matmul: |c|^2 - 2 c.x + |x|^2, [B, n, P]
    dist = torch.baddbmm(xyz.square().sum(-1)[:, None, :], centers, xyz.transpose(1, 2), beta=1.0, alpha=-2.0).add_(
        centers.square().sum(-1)[:, :, None]
    )
    if mask is not None:
        dist = dist.masked_fill(~mask[:, None, :], float("inf"))
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


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
        f = self.first(groups.transpose(1, 2))  # [M, 256, K]
        pooled = f.amax(dim=2, keepdim=True)
        f = self.second(torch.cat([pooled.expand_as(f), f], dim=1))  # [M, D, K]
        return f.amax(dim=2)


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
        if points.dim() != 3 or points.shape[-1] != self.in_channels:
            raise ValueError(f"points must be [B, P, {self.in_channels}], got {tuple(points.shape)}")
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
