"""Evaluation metrics for text outputs: WER / CER (ASR), exact match (VQA), BLEU-4 and CIDEr-D (captions)."""

from .text import bleu, cer, cider, edit_distance, exact_match, normalize_text, wer

__all__ = ["bleu", "cer", "cider", "edit_distance", "exact_match", "normalize_text", "wer"]
