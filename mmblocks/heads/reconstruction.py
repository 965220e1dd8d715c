"""`ReconstructionHead`: a detokenizer (`tokenizers_mm.create_detokenizer`) as the head of a masked-reconstruction
encoder (MAE on images, Point-MAE on point groups), its geometry read from the encoder's own tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from tokenizers_mm import Tokens, create_detokenizer
from tokenizers_mm.detokenizers import RandomMask, step_mask
from tokenizers_mm.points import group_points
from tokenizers_mm.vq import Distance, VectorQuantizer

from .registry import register_head

__all__ = ["RECONSTRUCTION_TARGETS", "ReconstructionHead", "ReconstructionOutput", "ReconstructionTarget"]

ReconstructionTarget = Literal["pixels", "points", "motion", "waveform"]
RECONSTRUCTION_TARGETS: tuple[str, ...] = get_args(ReconstructionTarget)


@dataclass
class ReconstructionOutput:
    """What the head returns: the detokenizer's ``pred`` (pixels: ``[B, L, p*p*C]``; points: local points of every
    group ``[B, G, K, 3]``), the ``masking`` the encoder drew (None: nothing hidden), the ``loss`` against the raw
    ``target`` when one was given, and for points the true ``groups`` ``[B, G, K, 3]`` and ``centers`` ``[B, G, 3]``
    the loss compared against; with a VQ bottleneck the ``codes`` ``[B, N]`` it chose; for waveforms the target
    ``feats`` (normalised fbank ``[B, T, F]``) and real ``frames`` ``[B]``."""

    pred: torch.Tensor
    masking: RandomMask | None = None
    loss: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    centers: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    feats: torch.Tensor | None = None
    frames: torch.Tensor | None = None

    @property
    def hidden(self) -> torch.Tensor | None:
        """``[B, L]`` float, 1 = hidden (where the loss is taken), or None."""
        return None if self.masking is None else self.masking.mask


def _pixels_geometry(tokenizer: nn.Module | None) -> dict[str, Any]:
    if tokenizer is None or not hasattr(tokenizer, "patch_embed"):
        raise ValueError(
            "detokenizer 'pixels' reads its patch size, channels and image size from an image_patches tokenizer, got "
            f"{type(tokenizer).__name__}"
        )
    grid, patch = tokenizer.grid_size, tokenizer.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise ValueError(f"detokenizer 'pixels' needs square patches, the tokenizer has {tuple(patch)}")
    return {
        "patch_size": patch[0],
        "in_chans": tokenizer.in_chans,
        "img_size": (grid[0] * patch[0], grid[1] * patch[1]),
    }


def _points_geometry(tokenizer: nn.Module | None) -> dict[str, Any]:
    if tokenizer is None or not hasattr(tokenizer, "group_size"):
        raise ValueError(
            f"detokenizer 'points' reads its group size from a points tokenizer, got {type(tokenizer).__name__}"
        )
    return {"group_size": tokenizer.group_size}


def _motion_geometry(tokenizer: nn.Module | None) -> dict[str, Any]:
    if tokenizer is None or not hasattr(tokenizer, "t_patch") or not hasattr(tokenizer, "scale"):
        raise ValueError(
            f"detokenizer 'motion' reads its patch geometry from a motion tokenizer, got {type(tokenizer).__name__}"
        )
    return {
        "patch_size": tokenizer.patch_size,
        "t_patch": tokenizer.t_patch,
        "block": tokenizer.block,
        "scale": tokenizer.scale,
        "pad_first": tokenizer.pad_first,
    }


def _waveform_geometry(tokenizer: nn.Module | None) -> dict[str, Any]:
    if tokenizer is None or not hasattr(tokenizer, "compute_fbank") or not hasattr(tokenizer, "tstride"):
        raise ValueError(
            f"detokenizer 'waveform' reads its fbank geometry from an audio_patches tokenizer, got "
            f"{type(tokenizer).__name__}"
        )
    p = tokenizer.patch_size
    if (tokenizer.fstride, tokenizer.tstride) != (p, p):
        raise ValueError(
            f"detokenizer 'waveform' needs non-overlapping fbank patches (fstride = tstride = patch_size = {p}), the "
            f"tokenizer has fstride={tokenizer.fstride}, tstride={tokenizer.tstride}"
        )
    if not tokenizer.normalize:
        raise ValueError("detokenizer 'waveform' expects the tokenizer's fbank normalisation (normalize: true)")
    return {
        "patch_size": p,
        "num_mel_bins": tokenizer.num_mel_bins,
        "target_frames": tokenizer.target_frames,
        "sample_rate": tokenizer.sample_rate,
        "norm_mean": tokenizer.norm_mean,
        "norm_std": tokenizer.norm_std,
        "fbank_kwargs": dict(tokenizer.fbank_kwargs),
        "subtract_waveform_mean": tokenizer.subtract_waveform_mean,
    }


@register_head("reconstruction")
class ReconstructionHead(nn.Module):
    """The final `Tokens` of an encoder that saw only the visible tokens -> a detokenizer's predictions (and loss).

    Args:
        in_dim: the encoder's width.
        detokenizer: what is reconstructed (`RECONSTRUCTION_TARGETS`): ``pixels`` (MAE's decoder, `PixelDecoder`) or
            ``points`` (Point-MAE's decoder, `PointDecoder`, Chamfer-L2 loss) or ``motion`` (`MotionDecoder`: a motion
            field from motion tokens, field MSE + the VQ commitment loss; no masking).
        decoder_dim / depth / num_heads / mlp_ratio: the decoder's transformer (MAE: 512 / 8 / 16 / 4; Point-MAE:
            384 / 4 / 6 / 4; lighter decoders cost little, MAE Table 1).
        norm_pix_loss: pixels: predict per-patch normalised pixels (MAE's better target).
        folding: points: a FoldingNet head instead of Point-MAE's linear one.
        codebook_size / code_dim / vq_distance / kmeans_init / dead_code_threshold: motion or pixels (with nothing
            hidden): a vector-quantisation bottleneck (`tokenizers_mm.VectorQuantizer`, EMA codebook) between the
            encoder and the decoder, as Video-LaVIT's motion tokenizer (cosine codes, 1024 x 32 there);
            ``codebook_size=0``: none.
        tokenizer: the encoder's tokenizer (set by the builder), whose geometry the decoder inverts.

    ``forward(tokens, masking=None, target=None, target_mask=None)``: ``masking`` is the `RandomMask` the encoder drew
    (`MMEncoder` with ``mask_ratio``), ``target`` the raw input (pixels: the normalised images ``[B, C, H, W]``;
    points: ``[B, P, 3 + C]``, grouped as the tokenizer groups them, ``target_mask [B, P]`` its padding; waveform:
    ``[B, S]`` and its padding; motion: the codec field ``[B, T-1, 2, h, w]`` and the frame mask ``[B, T]``).
    """

    def __init__(
        self,
        in_dim: int,
        detokenizer: ReconstructionTarget = "pixels",
        decoder_dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        folding: bool = False,
        codebook_size: int = 0,
        code_dim: int = 32,
        vq_distance: Distance = "cosine",
        kmeans_init: bool = True,
        dead_code_threshold: float = 0.0,
        tokenizer: nn.Module | None = None,
    ):
        super().__init__()
        if detokenizer not in RECONSTRUCTION_TARGETS:
            raise ValueError(f"detokenizer must be one of {RECONSTRUCTION_TARGETS}, got {detokenizer!r}")
        self.target_kind = detokenizer
        common = {"in_dim": in_dim, "decoder_dim": decoder_dim, "depth": depth, "num_heads": num_heads}
        self.vq = None
        if detokenizer == "pixels":
            kwargs = {**_pixels_geometry(tokenizer), "norm_pix_loss": norm_pix_loss}
        elif detokenizer == "waveform":
            kwargs = _waveform_geometry(tokenizer)
        elif detokenizer == "points":
            kwargs = {**_points_geometry(tokenizer), "head": "folding" if folding else "linear"}
            self.num_groups = int(tokenizer.num_groups)
        else:  # the motion decoder has no input projection of its own: it runs at decoder_dim
            kwargs = _motion_geometry(tokenizer)
            del common["decoder_dim"]
            common["in_dim"] = decoder_dim
        if codebook_size and detokenizer not in ("motion", "pixels"):
            raise ValueError(
                f"a VQ bottleneck (codebook_size) is for the motion and pixels targets, not {detokenizer!r}"
            )
        if codebook_size and detokenizer == "pixels" and norm_pix_loss:
            raise ValueError(
                "a VQ image tokenizer must predict pixels, not per-patch normalised ones (its images are rendered from "
                "codes alone, with no true patch statistics): set norm_pix_loss: false"
            )
        width = decoder_dim if detokenizer == "motion" else in_dim  # what the detokenizer takes
        if codebook_size:  # encoder width -> code_dim -> VQ -> the detokenizer's input width
            self.vq = VectorQuantizer(
                code_dim,
                codebook_size,
                distance=vq_distance,
                kmeans_init=kmeans_init,
                dead_code_threshold=dead_code_threshold,
            )
            self.pre_vq, self.post_vq = nn.Linear(in_dim, code_dim), nn.Linear(code_dim, width)
        elif detokenizer == "motion":
            self.pre_vq, self.post_vq = nn.Identity(), nn.Linear(in_dim, width)
        self.detokenizer = create_detokenizer(detokenizer, **common, mlp_ratio=mlp_ratio, **kwargs)
        # parameters no forward of this head uses would stall DDP (no find_unused_parameters): freeze them
        if codebook_size and detokenizer == "pixels":  # nothing hidden: no mask token
            self.detokenizer.mask_token.requires_grad_(False)
        if detokenizer == "points" and not getattr(tokenizer, "num_prefix_tokens", 0):  # no cls: no context position
            self.detokenizer.context_pos.requires_grad_(False)

    def _check_kept(self, tokens: Tokens, masking: RandomMask | None) -> None:
        if masking is not None and tokens.num_grid_tokens != masking.num_keep:
            raise ValueError(
                f"the encoder kept {masking.num_keep} grid tokens but the head got {tokens.num_grid_tokens}: a stage "
                "between them (a pooling or Q-Former adapter?) changed the token count; a masked decoder needs the "
                "kept tokens one for one"
            )

    def quantize(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The grid tokens through the bottleneck: ``(decoder input [B, N, D'], codes [B, N] or None, VQ loss or
        None)``; special tokens are dropped (a code per grid position)."""
        x = self.pre_vq(tokens.grid_tokens())
        codes, vq_loss = None, None
        if self.vq is not None:  # padded tokens get PAD_INDEX and never touch the codebook
            x, codes, vq_loss = self.vq(x, tokens.grid_mask())
        return self.post_vq(x), codes, vq_loss

    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """VQ ``codes [B, N]`` (e.g. generated by an LM) -> the detokenizer's prediction (pixels ``[B, N, p*p*C]``,
        motion ``[B, S, 2, h, w]``)."""
        if self.vq is None:
            raise ValueError("decode_codes needs a VQ bottleneck (codebook_size > 0)")
        x = self.post_vq(self.vq.decode(codes))
        return self.detokenizer(Tokens(x=x, grid=tuple(grid)))

    def forward(
        self,
        tokens: Tokens,
        masking: RandomMask | None = None,
        target: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
    ) -> ReconstructionOutput:
        if self.target_kind == "motion":
            return self._motion(tokens, masking, target, target_mask)
        self._check_kept(tokens, masking)
        if self.target_kind == "points":
            return self._points(tokens, masking, target, target_mask)
        if self.target_kind == "waveform":
            return self._waveform(tokens, masking, target, target_mask)
        codes = vq_loss = None
        if self.vq is not None:  # a discrete image tokenizer: every patch through the codebook, nothing hidden
            if masking is not None:
                raise ValueError("a VQ image tokenizer reconstructs every patch (no masking): set task.mask_ratio to 0")
            x, codes, vq_loss = self.quantize(tokens)
            tokens = Tokens(x=x, grid=tokens.grid, modality=tokens.modality)
        pred = self.detokenizer(tokens, None if masking is None else masking.ids_restore)
        out = ReconstructionOutput(pred=pred, masking=masking, codes=codes)
        if target is not None:
            out.loss = self.detokenizer.loss(target, pred, out.hidden)
            if vq_loss is not None:
                out.loss = out.loss + vq_loss
        return out

    def _points(
        self, tokens: Tokens, masking: RandomMask | None, target: torch.Tensor | None, target_mask: torch.Tensor | None
    ) -> ReconstructionOutput:
        if target is None:
            raise ValueError("detokenizer 'points' needs target= (the raw points): its group centres place the decoder")
        with torch.no_grad():  # the same FPS + kNN grouping as the tokenizer (deterministic), for centres and targets
            groups, centers, _ = group_points(target.float(), self.num_groups, self.detokenizer.group_size, target_mask)
        b, g = centers.shape[:2]
        if masking is None:
            masked = torch.zeros(b, g, dtype=torch.bool, device=centers.device)
        else:
            masked = masking.hidden
            # the encoder kept the visible groups in its noise order; the decoder takes them in group order
            order = masking.ids_keep.argsort(1)
            p, s = tokens.num_prefix, tokens.num_suffix
            grid = tokens.x[:, p : tokens.num_tokens - s]
            grid = torch.gather(grid, 1, order[..., None].expand(-1, -1, grid.shape[-1]))
            tokens = Tokens(
                x=torch.cat([tokens.x[:, :p], grid, tokens.x[:, tokens.num_tokens - s :]], 1),
                num_prefix=p,
                num_suffix=s,
                modality=tokens.modality,
            )
        pred = self.detokenizer(tokens, centers, masked)
        out = ReconstructionOutput(pred=pred, masking=masking, groups=groups[..., :3], centers=centers)
        if masking is not None:
            out.loss = self.detokenizer.loss(pred.float(), out.groups, masked)
        return out

    def _motion(
        self, tokens: Tokens, masking: RandomMask | None, target: torch.Tensor | None, target_mask: torch.Tensor | None
    ) -> ReconstructionOutput:
        if masking is not None:
            raise ValueError("detokenizer 'motion' reconstructs every token (no masking): set task.mask_ratio to 0")
        x, codes, vq_loss = self.quantize(tokens)
        pred = self.detokenizer(Tokens(x=x, grid=tokens.grid, modality=tokens.modality))
        out = ReconstructionOutput(pred=pred, codes=codes)
        if target is not None:
            out.loss = self.detokenizer.loss(pred, target, step_mask(target_mask))  # the loss moves the mask
            if vq_loss is not None:
                out.loss = out.loss + vq_loss
        return out

    def _waveform(
        self, tokens: Tokens, masking: RandomMask | None, target: torch.Tensor | None, target_mask: torch.Tensor | None
    ) -> ReconstructionOutput:
        dec = self.detokenizer
        pred = dec(tokens, None if masking is None else masking.ids_restore, dec.grid_size)
        out = ReconstructionOutput(pred=pred, masking=masking)
        if target is not None:
            lengths = None if target_mask is None else target_mask.sum(1)
            with torch.no_grad():
                out.feats, out.frames = dec.features(target, lengths)
            out.loss = dec.loss(out.feats, pred, out.hidden, out.frames)
        return out
