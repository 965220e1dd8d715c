"""`pixels`: the MAE decoder, grid tokens back to patch pixels (He et al. 2022; HF ``ViTMAEDecoder``).

An MAE encoder sees only the visible patches (`masking.random_masking` + `masking.keep_tokens`). The decoder
1. embeds its tokens to the decoder width,
2. puts a learned mask token at every hidden position (unshuffling with ``ids_restore``),
3. adds a fixed 2-D sin-cos position table (MAE's layout, special tokens at zero),
4. runs a few pre-norm transformer blocks (timm ``Block``),
5. and maps each grid token to its ``p*p*C`` pixels (`tokenizers_mm.image.patchify` layout).

The loss is MAE's: per-patch MSE, optionally against per-patch normalised pixels (``norm_pix_loss``), averaged over
the hidden patches only. With weights copied from an HF ``ViTMAEForPreTraining`` (`PixelDecoder.from_hf_vit_mae`)
and the same masking noise, predictions and loss equal HF's (``tests/test_detokenizers_pixels.py``).

`PatchDecoder` is the modality-free core (any 2-D patch grid: image pixels, fbank patches); `PixelDecoder` adds the
image geometry, the loss and `render`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..image import patchify, unpatchify
from ..registry import register_detokenizer
from ..tokens import Tokens

__all__ = ["PatchDecoder", "PixelDecoder", "init_xavier", "mae_sincos_2d", "patch_mse", "psnr"]


def mae_sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table ``[h*w, dim]`` (row-major tokens): ``[sin(c w), cos(c w), sin(r w),
    cos(r w)]`` for a token at row ``r``, column ``c``, ``w = temperature^(-k / (dim/4))`` (float64 inside, as MAE's
    NumPy code and HF)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    r, c = rows.flatten().outer(omega), cols.flatten().outer(omega)
    return torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1).float()


def patch_mse(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """MAE's loss: the mean over patch values of ``(pred - target)^2`` per patch ``[B, L]``, averaged over the hidden
    patches (``hidden [B, L]``, 1 / True = hidden) or over every patch when ``hidden`` is None."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    if hidden is None:
        return per_patch.mean()
    hidden = hidden.to(per_patch.dtype)
    if hidden.shape != per_patch.shape:
        raise ValueError(f"hidden must be [B, L] = {tuple(per_patch.shape)}, got {tuple(hidden.shape)}")
    return (per_patch * hidden).sum() / hidden.sum().clamp_min(1.0)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample ``[B]`` in dB: ``10 log10(range^2 / MSE)`` over every other dim."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


class PatchDecoder(nn.Module):
    """MAE decoder over a 2-D patch grid: ``Tokens`` (visible grid tokens + special tokens) -> ``[B, L, out_dim]``.

    Args:
        in_dim: width of the incoming (encoder) tokens.
        out_dim: values predicted per patch (``p*p*C`` for pixels).
        grid_size: the training grid ``(h, w)`` (used when ``forward`` is given no grid).
        decoder_dim / depth / num_heads / mlp_ratio: the decoder's transformer (MAE: 512 / 8 / 16 / 4).
        norm_eps: LayerNorm epsilon (timm 1e-6; HF ViTMAE 1e-12).
        qkv_bias: attention projections with bias (MAE: True).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid_size: tuple[int, int] | int = (14, 14),
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        qkv_bias: bool = True,
    ):
        super().__init__()
        if decoder_dim % num_heads:
            raise ValueError(f"decoder_dim={decoder_dim} is not divisible by num_heads={num_heads}")
        self.in_dim, self.out_dim, self.decoder_dim = int(in_dim), int(out_dim), int(decoder_dim)
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(int(g) for g in grid_size)
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.embed = nn.Linear(in_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.blocks = nn.ModuleList(
            [Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_xavier)

    def forward(
        self, tokens: Tokens, ids_restore: torch.Tensor | None = None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``tokens`` -> predictions ``[B, L, out_dim]`` for every grid position (special tokens dropped).

        ``ids_restore [B, L]`` (`masking.RandomMask.ids_restore`): ``tokens`` hold the visible grid tokens in the
        order of ``ids_keep`` and the other ``L - K`` positions get the mask token. Without it, ``tokens`` hold the
        whole grid in row-major order. ``grid`` defaults to ``tokens.grid``, then to ``grid_size``.
        """
        if not isinstance(tokens, Tokens):
            raise TypeError(f"{type(self).__name__} decodes Tokens, got {type(tokens).__name__}")
        if tokens.dim != self.in_dim:
            raise ValueError(f"{type(self).__name__} expects tokens of width {self.in_dim}, got {tokens.dim}")
        grid = tuple(grid or tokens.grid or self.grid_size)
        length = math.prod(grid)
        p, s = tokens.num_prefix, tokens.num_suffix
        x = self.embed(tokens.x)
        special = torch.cat([x[:, :p], x[:, x.shape[1] - s :]], dim=1)
        visible = x[:, p : x.shape[1] - s]
        if ids_restore is None:
            if visible.shape[1] != length:
                raise ValueError(
                    f"without ids_restore the tokens must fill the grid {grid} ({length} tokens), "
                    f"got {visible.shape[1]}"
                )
            grid_x = visible
        else:
            if tuple(ids_restore.shape) != (x.shape[0], length):
                raise ValueError(
                    f"ids_restore must be [B, L] = [{x.shape[0]}, {length}], got {tuple(ids_restore.shape)}"
                )
            hidden = length - visible.shape[1]
            if hidden < 0:
                raise ValueError(f"{visible.shape[1]} visible tokens exceed the grid's {length} positions")
            grid_x = torch.cat([visible, self.mask_token.to(x.dtype).expand(x.shape[0], hidden, -1)], dim=1)
            grid_x = torch.gather(grid_x, 1, ids_restore.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        table = mae_sincos_2d(grid, self.decoder_dim).to(device=x.device, dtype=x.dtype)
        x = torch.cat([special, grid_x + table], dim=1)  # special tokens sit at position zero (MAE's cls row)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, special.shape[1] :]


def init_xavier(m: nn.Module) -> None:
    """MAE's and Point-MAE's decoder init (``module.apply``): xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@register_detokenizer("pixels")
class PixelDecoder(PatchDecoder):
    """MAE pixel decoder: image grid tokens -> patch pixels ``[B, L, p*p*C]``, loss, and images.

    Args:
        in_dim: width of the encoder tokens.
        patch_size / in_chans / img_size: the image geometry of the tokenizer (`ImagePatches`).
        norm_pix_loss: predict per-patch normalised pixels (MAE's better target; `render` then needs the images'
            own patch statistics, as MAE's visualisations do).
        decoder_dim / depth / num_heads / mlp_ratio / norm_eps / qkv_bias: see `PatchDecoder`.
    """

    def __init__(
        self,
        in_dim: int,
        patch_size: int = 16,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        qkv_bias: bool = True,
    ):
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if hw[0] % patch_size or hw[1] % patch_size:
            raise ValueError(f"img_size {hw} is not a multiple of patch_size={patch_size}")
        super().__init__(
            in_dim,
            patch_size * patch_size * in_chans,
            (hw[0] // patch_size, hw[1] // patch_size),
            decoder_dim,
            depth,
            num_heads,
            mlp_ratio,
            norm_eps,
            qkv_bias,
        )
        self.patch_size, self.in_chans, self.norm_pix_loss = int(patch_size), int(in_chans), bool(norm_pix_loss)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The pixel target ``[B, L, p*p*C]`` of ``images [B, C, H, W]`` (per-patch normalised with norm_pix_loss)."""
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"pixels expects images [B, {self.in_chans}, H, W], got shape {tuple(images.shape)}")
        target = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, images: torch.Tensor, pred: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """MAE's loss of ``pred [B, L, p*p*C]`` against ``images [B, C, H, W]`` over the ``hidden [B, L]`` patches."""
        return patch_mse(pred, self.target(images), hidden)

    def render(
        self,
        pred: torch.Tensor,
        grid: tuple[int, int] | None = None,
        images: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predictions ``[B, L, p*p*C]`` -> images ``[B, C, H, W]`` in the input's pixel space.

        With ``norm_pix_loss`` the predictions are per-patch normalised: ``images`` supplies each patch's mean and
        std (MAE's visualisation). ``hidden [B, L]`` pastes the true visible patches around the predicted hidden
        ones (MAE's "reconstruction + visible" panel)."""
        grid = tuple(grid or self.grid_size)
        out = pred
        if self.norm_pix_loss or hidden is not None:
            if images is None:
                raise ValueError(
                    "render needs images= for norm_pix_loss predictions (their patch mean/std) or for hidden="
                )
            true = patchify(images, self.patch_size).to(pred.dtype)
            if self.norm_pix_loss:
                mean, var = true.mean(-1, keepdim=True), true.var(-1, keepdim=True)
                out = out * (var + 1e-6) ** 0.5 + mean
            if hidden is not None:
                keep = hidden.to(out.device).bool().unsqueeze(-1)
                out = torch.where(keep, out, true)
        return unpatchify(out, self.patch_size, grid)

    @classmethod
    def from_hf_vit_mae(cls, decoder: nn.Module, norm_pix_loss: bool | None = None) -> PixelDecoder:
        """A `PixelDecoder` holding a copy of an HF ``ViTMAEDecoder``'s weights (``ViTMAEForPreTraining.decoder``)."""
        cfg = decoder.config
        num_patches = decoder.decoder_pos_embed.shape[1] - 1
        side = math.isqrt(num_patches)
        table = decoder.decoder_pos_embed.detach()[0].float().cpu()
        expected = mae_sincos_2d((side, side), table.shape[-1])
        if not (torch.allclose(table[1:], expected, atol=1e-5) and not table[0].any()):
            raise ValueError(
                "this ViTMAEDecoder's decoder_pos_embed is not MAE's fixed 2-D sin-cos table (PixelDecoder computes "
                "that table itself); transformers 5 leaves it at zero in a model built from a config: call "
                "decoder.initialize_weights(num_patches) first, or load a checkpoint"
            )
        dec = cls(
            in_dim=decoder.decoder_embed.in_features,
            patch_size=cfg.patch_size,
            in_chans=cfg.num_channels,
            img_size=side * cfg.patch_size,
            norm_pix_loss=cfg.norm_pix_loss if norm_pix_loss is None else norm_pix_loss,
            decoder_dim=cfg.hidden_size,
            depth=len(decoder.decoder_layers),
            num_heads=cfg.num_attention_heads,
            mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
            norm_eps=cfg.layer_norm_eps,
            qkv_bias=cfg.qkv_bias,
        )
        with torch.no_grad():
            dec.embed.load_state_dict(decoder.decoder_embed.state_dict())
            dec.mask_token.copy_(decoder.mask_token)
            dec.norm.load_state_dict(decoder.decoder_norm.state_dict())
            dec.pred.load_state_dict(decoder.decoder_pred.state_dict())
            for ours, theirs in zip(dec.blocks, decoder.decoder_layers):
                _copy_vit_layer(ours, theirs)
        return dec


def _copy_vit_layer(ours: Block, theirs: nn.Module) -> None:
    """HF ViTMAE layer (transformers 5: ``attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``) -> timm ``Block`` (q, k, v
    stacked into timm's fused qkv)."""
    att = theirs.attention
    if not hasattr(att, "q_proj"):
        raise ValueError(f"expected an HF ViTMAELayer with attention.q_proj/k_proj/v_proj (transformers 5), got {att}")
    q, k, v = att.q_proj, att.k_proj, att.v_proj
    ours.attn.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
    if ours.attn.qkv.bias is not None:
        ours.attn.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    ours.attn.proj.load_state_dict(att.o_proj.state_dict())
    ours.norm1.load_state_dict(theirs.layernorm_before.state_dict())
    ours.norm2.load_state_dict(theirs.layernorm_after.state_dict())
    ours.mlp.fc1.load_state_dict(theirs.mlp.fc1.state_dict())
    ours.mlp.fc2.load_state_dict(theirs.mlp.fc2.state_dict())
