"""`ContrastiveModel`: an mmblocks encoder with a contrastive head, behind open_clip's model interface.

open_clip's and CLIP_benchmark's functions take a model with ``encode_image(x, normalize=False)``,
``encode_text(ids, normalize=False)`` and ``forward(image, text)`` returning normalised ``image_features``,
``text_features`` and the exponentiated ``logit_scale`` (and ``logit_bias`` for SigLIP). This wrapper gives an
`MMEncoder` whose head is a `mmblocks.heads.ContrastiveHead` exactly that, for every modality: "image" is open_clip's
name for the non-text input (``encode_modality`` is an alias); a batch's padding ``mask`` and side inputs (a video's
codec ``motion``) go along as keywords. It shares the encoder's parameters (no copy): train the encoder, evaluate
through the wrapper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..heads import ContrastiveHead
from .encoder import MMEncoder

__all__ = ["ContrastiveModel"]


class ContrastiveModel(nn.Module):
    """open_clip's interface over an `MMEncoder` with a `ContrastiveHead`.

    Args:
        encoder: the encoder; its head must be a `ContrastiveHead` (built by ``task: contrastive`` with
            ``model.text_tower``).
    """

    def __init__(self, encoder: MMEncoder):
        super().__init__()
        if not isinstance(getattr(encoder, "head", None), ContrastiveHead):
            got = type(getattr(encoder, "head", None)).__name__
            raise ValueError(
                "a ContrastiveModel needs an encoder with a contrastive head (task: contrastive and "
                f"model.text_tower), got head {got}"
            )
        self.encoder = encoder

    @property
    def head(self) -> ContrastiveHead:
        return self.encoder.head

    @property
    def logit_scale(self) -> nn.Parameter:
        """The log of the logit scale (open_clip's parameter; `forward` returns it exponentiated)."""
        return self.head.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return self.head.logit_bias

    def tokenizer(self, texts: list[str] | str) -> torch.Tensor:
        """Strings -> the text tower's token ids ``[N, L]`` (open_clip's ``get_tokenizer(...)(texts)``)."""
        return self.head.tokenize([texts] if isinstance(texts, str) else list(texts))

    def encode_image(
        self, image: torch.Tensor, normalize: bool = False, mask: torch.Tensor | None = None, **extra: torch.Tensor
    ) -> torch.Tensor:
        """The modality input (``[B, C, H, W]`` images, ``[B, P, 3 + C]`` points, ``[B, S]`` waveforms, ``[B, T, C,
        H, W]`` frames; `mask` and `extra` as the loader gives them) -> joint embeddings ``[B, E]``."""
        return self.head.encode_tokens(self.encoder.forward_features(image, mask, **extra), normalize)

    encode_modality = encode_image

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids ``[N, L]`` (from `tokenizer`) -> joint embeddings ``[N, E]``."""
        return self.head.encode_text(text, normalize)

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        **extra: torch.Tensor,
    ) -> dict[str, Any]:
        """open_clip's ``CLIP.forward``: normalised ``image_features`` / ``text_features`` (each when its input is
        given), ``logit_scale`` exponentiated, and ``logit_bias`` when the head has one."""
        out: dict[str, Any] = {}
        if image is not None:
            out["image_features"] = self.encode_image(image, normalize=True, mask=mask, **extra)
        if text is not None:
            out["text_features"] = self.encode_text(text, normalize=True)
        out["logit_scale"] = self.head.scale()
        if self.head.logit_bias is not None:
            out["logit_bias"] = self.head.logit_bias
        return out
