"""`waveform`: audio tokens back to sound. An MAE decoder over Kaldi-fbank patches (Audio-MAE's layout: the AST
tokenizer's non-overlapping ``p x p`` patches, frequency rows first) predicts the normalised fbank, and a Griffin-Lim
vocoder with Kaldi's banks (`GriffinLimVocoder`) turns it into a waveform you can listen to.

The loss is the patch MSE on the normalised fbank over the hidden patches that hold real frames (AST pads every clip
to ``target_frames``; padded columns are neither hidden targets nor scored).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..audio import AST_FBANK_KWARGS, fbank_with_lengths, remove_waveform_mean
from ..image import patchify, unpatchify
from ..registry import register_detokenizer
from .pixels import PatchDecoder, patch_mse
from .waveform import GriffinLimVocoder

__all__ = ["WaveformDecoder"]

# Kaldi fbank options the vocoder inverts (framing, window, band edges, pre-emphasis); the rest do not change it
_VOCODER_KEYS = {
    "frame_length": "frame_length",
    "frame_shift": "frame_shift",
    "round_to_power_of_two": "round_to_power_of_two",
    "snip_edges": "snip_edges",
    "window_type": "window_type",
    "blackman_coeff": "blackman_coeff",
    "low_freq": "f_min",
    "high_freq": "f_max",
    "preemphasis_coefficient": "preemphasis_coefficient",
}


@register_detokenizer("waveform")
class WaveformDecoder(PatchDecoder):
    """Fbank-patch tokens -> normalised fbank patches ``[B, L, p*p]`` (MAE decoder), and fbank -> waveform.

    Args:
        in_dim: width of the encoder tokens.
        patch_size / num_mel_bins / target_frames / sample_rate / norm_mean / norm_std / fbank_kwargs /
            subtract_waveform_mean: the `AudioPatches` tokenizer's (its patches must not overlap: strides equal to
            the patch size).
        decoder_dim / depth / num_heads / mlp_ratio / norm_eps: see `PatchDecoder`.
        n_iter: Griffin-Lim iterations of `to_waveform`.
    """

    def __init__(
        self,
        in_dim: int,
        patch_size: int = 16,
        num_mel_bins: int = 128,
        target_frames: int = 1024,
        sample_rate: int = 16000,
        norm_mean: float = -4.2677393,
        norm_std: float = 4.5689974,
        fbank_kwargs: dict[str, Any] | None = None,
        subtract_waveform_mean: bool = True,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        n_iter: int = 32,
    ):
        if num_mel_bins % patch_size or target_frames % patch_size:
            raise ValueError(
                f"num_mel_bins={num_mel_bins} and target_frames={target_frames} must be multiples of patch_size="
                f"{patch_size} (non-overlapping patches)"
            )
        grid = (num_mel_bins // patch_size, target_frames // patch_size)
        super().__init__(in_dim, patch_size * patch_size, grid, decoder_dim, depth, num_heads, mlp_ratio, norm_eps)
        self.patch_size, self.num_mel_bins, self.target_frames = int(patch_size), int(num_mel_bins), int(target_frames)
        self.sample_rate, self.norm_mean, self.norm_std = int(sample_rate), float(norm_mean), float(norm_std)
        self.fbank_kwargs = {**AST_FBANK_KWARGS, "num_mel_bins": num_mel_bins, **(fbank_kwargs or {})}
        self.subtract_waveform_mean = bool(subtract_waveform_mean)
        vocoder = {_VOCODER_KEYS[k]: v for k, v in self.fbank_kwargs.items() if k in _VOCODER_KEYS}
        self.vocoder = GriffinLimVocoder(
            "kaldi_fbank",
            sample_rate,
            n_mels=num_mel_bins,
            mean=norm_mean,
            std=norm_std,
            n_iter=n_iter,
            rand_init=False,
            **vocoder,
        )

    def features(
        self, waveform: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``waveform [B, S]`` (``lengths`` real samples) -> the tokenizer's input: normalised fbank ``[B, T, F]``
        padded / cut to ``target_frames``, and the real frames per clip ``[B]`` (in float32, autocast off)."""
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            return self._features(waveform, lengths)

    def _features(self, waveform: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.subtract_waveform_mean:
            waveform, lengths = remove_waveform_mean(waveform.float(), lengths)
        feats, frames = fbank_with_lengths(waveform.float(), self.sample_rate, lengths, **self.fbank_kwargs)
        t = feats.shape[1]
        feats = F.pad(feats, (0, 0, 0, self.target_frames - t)) if t < self.target_frames else feats
        feats = feats[:, : self.target_frames]
        return (feats - self.norm_mean) / (2 * self.norm_std), frames.clamp_max(self.target_frames)

    def target(self, feats: torch.Tensor) -> torch.Tensor:
        """Normalised fbank ``[B, T, F]`` -> its patches ``[B, L, p*p]`` in the tokenizer's token order."""
        return patchify(feats.transpose(1, 2).unsqueeze(1), self.patch_size)

    def real_patches(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: the patches whose column holds at least one real frame (the tokenizer's mask rule)."""
        fp, tp = self.grid_size
        cols = torch.arange(tp, device=frames.device) * self.patch_size < frames[:, None]
        return cols[:, None, :].expand(-1, fp, -1).reshape(frames.shape[0], fp * tp)

    def loss(
        self, feats: torch.Tensor, pred: torch.Tensor, hidden: torch.Tensor | None, frames: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch MSE on the normalised fbank over the hidden patches (and only real ones when ``frames`` is given)."""
        weight = torch.ones(pred.shape[:2], device=pred.device) if hidden is None else hidden.float()
        if frames is not None:
            weight = weight * self.real_patches(frames.to(pred.device))
        return patch_mse(pred, self.target(feats), weight)

    def spectrogram(
        self, pred: torch.Tensor, feats: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predictions ``[B, L, p*p]`` -> normalised fbank ``[B, T, F]``; with ``feats`` and ``hidden`` the visible
        patches are the true ones."""
        if hidden is not None:
            if feats is None:
                raise ValueError("spectrogram: hidden= needs feats= (the true fbank of the visible patches)")
            pred = torch.where(hidden.bool().unsqueeze(-1), pred, self.target(feats).to(pred.dtype))
        return unpatchify(pred, self.patch_size, self.grid_size)[:, 0].transpose(1, 2)

    @torch.no_grad()
    def to_waveform(self, feats: torch.Tensor, frames: torch.Tensor) -> list[torch.Tensor]:
        """Normalised fbank ``[B, T, F]`` -> one waveform per clip, each cut to its ``frames`` real frames first
        (padding is fbank 0, i.e. energy 1, not silence)."""
        return [self.vocoder(f[: max(int(n), self.vocoder.min_frames)].float()) for f, n in zip(feats, frames)]
