"""Activation maps: where on the input the tokens' feature norms are high, before and after the LLM stage.

The center paper's information-filtering hypothesis: a frozen LLM block amplifies the tokens that carry the object
and damps the others. Measured here as the ROC AUC of each token's feature norm against a foreground mask (is the
object under this token?): 0.5 means the norms ignore the object, 1 that every object token outranks every
background token. Masks come from the images themselves (pixels that differ from the image's border colour), which
suits objects on a plain background (`digits`, `shapes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tokenizers_mm import Tokens

from .figures import pyplot, save_figure

__all__ = ["foreground_auc", "patch_foreground", "plot_activation_maps", "token_norm_maps"]


def token_norm_maps(tokens: Tokens) -> torch.Tensor:
    """The L2 norm of each grid token, on its grid: ``[B, *grid]`` (prefix and suffix tokens left out)."""
    if tokens.grid is None:
        raise ValueError("token_norm_maps needs tokens on a regular grid (Tokens.grid), e.g. image patches")
    x = tokens.grid_tokens().float()
    return x.norm(dim=-1).reshape(x.shape[0], *tokens.grid)


def patch_foreground(images: torch.Tensor, grid: Sequence[int], threshold: float = 0.5, min_fraction: float = 0.2):
    """``[B, gh, gw]`` bool: whether a patch holds the object, from images ``[B, C, H, W]``.

    A pixel is foreground when it differs from the image's background colour (the median of its border pixels) by
    more than `threshold` times the image's per-channel std (max over channels); a patch is foreground when at least
    `min_fraction` of its pixels are.
    """
    if images.dim() != 4:
        raise ValueError(f"patch_foreground expects images [B, C, H, W], got {tuple(images.shape)}")
    gh, gw = (int(g) for g in grid)
    b, _, h, w = images.shape
    if h % gh or w % gw:
        raise ValueError(f"images {h}x{w} do not split into a {gh}x{gw} grid of patches")
    img = images.float()
    border = torch.cat([img[..., 0, :], img[..., -1, :], img[..., :, 0], img[..., :, -1]], dim=-1)  # [B, C, 2H+2W]
    background = border.median(dim=-1).values[..., None, None]
    scale = img.flatten(2).std(-1).clamp_min(1e-6)[..., None, None]
    pixel = ((img - background).abs() / scale).amax(1) > threshold  # [B, H, W]
    frac = pixel.float().reshape(b, gh, h // gh, gw, w // gw).mean((2, 4))
    return frac >= min_fraction


def foreground_auc(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean over images of the ROC AUC of token norms (``maps [B, gh, gw]``) against foreground (``masks``, bool);
    images whose mask is all foreground or all background are left out (NaN when none is left)."""
    from sklearn.metrics import roc_auc_score

    scores = []
    for m, f in zip(maps.reshape(maps.shape[0], -1), masks.reshape(masks.shape[0], -1)):
        if 0 < int(f.sum()) < f.numel():
            scores.append(roc_auc_score(f.numpy(), m.numpy()))
    return float(sum(scores) / len(scores)) if scores else float("nan")


def plot_activation_maps(
    images: torch.Tensor,
    maps: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | Path,
    num: int = 6,
) -> Path:
    """A grid: one row per (run, place) of norm maps overlaid on the first `num` images, the images on top.

    Args:
        images: ``[B, C, H, W]`` (normalised; shown min-max scaled).
        maps: run name -> place ("before", "after", ...) -> ``[B, gh, gw]``.
    """
    plt = pyplot()
    import torch.nn.functional as F

    num = min(num, images.shape[0])
    rows = [(run, place, m) for run, places in maps.items() for place, m in places.items()]
    fig, axes = plt.subplots(1 + len(rows), num, figsize=(1.6 * num, 1.6 * (1 + len(rows))), squeeze=False)
    shown = images[:num].float()
    lo, hi = shown.amin((1, 2, 3), keepdim=True), shown.amax((1, 2, 3), keepdim=True)
    shown = ((shown - lo) / (hi - lo).clamp_min(1e-6)).permute(0, 2, 3, 1)
    if shown.shape[-1] == 1:
        shown = shown.expand(-1, -1, -1, 3)
    for j in range(num):
        axes[0, j].imshow(shown[j].numpy())
    axes[0, 0].set_ylabel("input", fontsize=7)
    h, w = images.shape[-2:]
    for i, (run, place, m) in enumerate(rows, start=1):
        for j in range(num):
            up = F.interpolate(m[j][None, None].float(), size=(h, w), mode="nearest")[0, 0]
            up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-6)
            axes[i, j].imshow(shown[j].numpy() * 0.45)
            axes[i, j].imshow(up.numpy(), cmap="inferno", alpha=0.6)
        axes[i, 0].set_ylabel(f"{run}\n{place}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path, dpi=110)
