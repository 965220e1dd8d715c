"""Evaluation: text metrics (WER / CER for ASR, exact match for VQA, BLEU-4 and CIDEr-D for captions) and zero-shot
classification and retrieval with any CLIP-like model (CLIP_benchmark's definitions)."""

from .retrieval import evaluate_retrieval, grouped_retrieval_metrics, retrieval_metrics
from .text import bleu, cer, cider, edit_distance, exact_match, normalize_text, wer
from .zeroshot import classification_metrics, classify, evaluate_classification, fill_template, zero_shot_classifier

__all__ = [
    "bleu",
    "cer",
    "cider",
    "classification_metrics",
    "classify",
    "edit_distance",
    "evaluate_classification",
    "evaluate_retrieval",
    "exact_match",
    "fill_template",
    "grouped_retrieval_metrics",
    "normalize_text",
    "retrieval_metrics",
    "wer",
    "zero_shot_classifier",
]
