"""Modality tokenizers and the `Tokens` container they produce.

This package never imports `adapters` or `mmblocks` (dependencies flow tokenizers_mm <- adapters <- mmblocks).
"""

from . import detokenizers  # registers the detokenizers
from .audio import AudioFrames, AudioPatches, fbank, fbank_with_lengths
from .checks import check_input
from .image import ImagePatches
from .motion import KeyframeMotion, MotionTokens, block_matching
from .points import PointGroups, farthest_point_sample, knn_group
from .registry import (
    create_detokenizer,
    create_tokenizer,
    list_detokenizers,
    list_tokenizers,
    register_detokenizer,
    register_tokenizer,
)
from .tokens import Tokens
from .video import VideoTubelets, normalize_frames
from .vq import VectorQuantizer

__all__ = [
    "detokenizers",
    "check_input",
    "AudioFrames",
    "AudioPatches",
    "ImagePatches",
    "PointGroups",
    "Tokens",
    "create_detokenizer",
    "create_tokenizer",
    "fbank",
    "fbank_with_lengths",
    "farthest_point_sample",
    "knn_group",
    "list_detokenizers",
    "list_tokenizers",
    "register_detokenizer",
    "register_tokenizer",
    "KeyframeMotion",
    "MotionTokens",
    "VectorQuantizer",
    "VideoTubelets",
    "block_matching",
    "normalize_frames",
]
