"""Detokenizers: `Tokens` back to a modality (design §1), registered for `tokenizers_mm.create_detokenizer`."""

from .masking import RandomMask, keep_tokens, random_masking
from .motion import WARP_PADDINGS, MotionDecoder, endpoint_error, step_mask, upsample_field, warp, warp_clip
from .pixels import PatchDecoder, PixelDecoder, mae_sincos_2d, patch_mse, psnr
from .points import PointDecoder, chamfer_distance, random_group_mask, select_visible
from .spectrogram import WaveformDecoder
from .waveform import GriffinLimVocoder, log_spectral_distance, save_audio, spectral_convergence

__all__ = [
    "WARP_PADDINGS",
    "MotionDecoder",
    "endpoint_error",
    "step_mask",
    "upsample_field",
    "warp",
    "warp_clip",
    "GriffinLimVocoder",
    "PatchDecoder",
    "WaveformDecoder",
    "log_spectral_distance",
    "save_audio",
    "spectral_convergence",
    "PointDecoder",
    "chamfer_distance",
    "random_group_mask",
    "select_visible",
    "PixelDecoder",
    "RandomMask",
    "keep_tokens",
    "mae_sincos_2d",
    "patch_mse",
    "psnr",
    "random_masking",
]
