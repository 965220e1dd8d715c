"""`CodeLMHead`: a causal LM whose vocabulary is extended with a VQ codebook generates a modality (LLM-CXR,
Video-LaVIT): text prompt -> ``<boi>`` -> codes -> ``<eoi>``, the codes rendered by the frozen VQ tokenizer's decoder.

The head *is* the VQ tokenizer's `ReconstructionHead` (same parameter names, so ``model.init`` loads a trained one from
its checkpoint) plus the LM. The tokenizer (``pre_vq``, ``vq``, ``post_vq``, ``detokenizer``) is frozen and kept in
eval mode (its EMA codebook never moves); it turns training images into their codes, and generated codes into
images. The LM's own vocabulary is untouched: the ``K`` codes and ``<boi>`` / ``<eoi>`` get an input embedding table
of their own (initialised at the scale of the LM's token embeddings) and the positions after ``<boi>`` a code output
layer, so the extension trains while the pretrained LM stays frozen or LoRA-tuned, and sampling at image positions
is restricted to codes (as LLM-CXR's constrained decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_mm import Tokens
from tokenizers_mm.vq import Distance

from .reconstruction import ReconstructionHead

__all__ = ["CodeLMHead", "CodeLMOutput"]


@dataclass
class CodeLMOutput:
    """``loss`` (mean cross-entropy of the codes and ``<eoi>`` given the prompt, teacher-forced), ``logits``
    ``[B, N + 1, K + 1]`` at the image positions, and the true ``codes`` ``[B, N]`` of the images."""

    loss: torch.Tensor
    logits: torch.Tensor
    codes: torch.Tensor


class CodeLMHead(ReconstructionHead):
    """Text -> VQ codes with a causal LM (its vocabulary extended with the codebook) -> the modality.

    Args:
        in_dim / detokenizer / decoder_dim / depth / num_heads / mlp_ratio / norm_pix_loss / codebook_size /
            code_dim / vq_distance / tokenizer: the VQ tokenizer's `ReconstructionHead` options (give the ones it was
            trained with; ``model.init`` loads its weights).
        lm: a `transformers` causal LM (peft-wrapped or not; the ``code_lm`` head of `mmblocks.tasks.text_to_image`
            loads it with `mmblocks.llm.load_lm`).
    """

    def __init__(
        self,
        in_dim: int,
        lm: nn.Module,
        detokenizer: Literal["pixels", "motion"] = "pixels",
        decoder_dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        codebook_size: int = 128,
        code_dim: int = 16,
        vq_distance: Distance = "euclidean",
        tokenizer: nn.Module | None = None,
    ):
        if codebook_size < 1:
            raise ValueError(f"code_lm generates VQ codes: codebook_size must be >= 1, got {codebook_size}")
        super().__init__(
            in_dim,
            detokenizer,
            decoder_dim,
            depth,
            num_heads,
            mlp_ratio,
            norm_pix_loss,
            codebook_size=codebook_size,
            code_dim=code_dim,
            vq_distance=vq_distance,
            kmeans_init=False,
            tokenizer=tokenizer,
        )
        for module in self._codec():
            module.requires_grad_(False)
        self.lm = lm
        table = self.lm.get_input_embeddings()
        width = int(table.weight.shape[1])
        self.codebook_size = int(codebook_size)
        self.code_embed = nn.Embedding(codebook_size + 2, width)  # codes 0..K-1, <boi> = K, <eoi> = K + 1
        nn.init.normal_(self.code_embed.weight, std=float(table.weight.detach().float().std()))
        self.code_head = nn.Linear(width, codebook_size + 1)  # codes 0..K-1 and <eoi> = K
        nn.init.zeros_(self.code_head.bias)

    @property
    def boi(self) -> int:
        return self.codebook_size

    @property
    def eoi(self) -> int:
        """The ``<eoi>`` index in the code output layer (the input table holds it at ``K + 1``)."""
        return self.codebook_size

    def _codec(self) -> list[nn.Module]:
        """The frozen VQ tokenizer's parts."""
        return [self.pre_vq, self.vq, self.post_vq, self.detokenizer]

    def codec_state_names(self) -> list[str]:
        """Names (relative to this head) of the VQ tokenizer's tensors that a trained tokenizer's checkpoint must
        provide (`mmblocks.builders.build_encoder` checks it): every parameter and persistent buffer of ``pre_vq``,
        ``vq``, ``post_vq`` and the decoder, but the decoder's mask token (a VQ autoencoder hides nothing)."""
        names = []
        for attr in ("pre_vq", "vq", "post_vq", "detokenizer"):
            names += [f"{attr}.{n}" for n in getattr(self, attr).state_dict()]
        return [n for n in names if n != "detokenizer.mask_token"]

    def train(self, mode: bool = True) -> CodeLMHead:
        super().train(mode)
        for module in self._codec():  # the frozen tokenizer: no EMA codebook update, no dropout
            module.eval()
        return self

    @torch.no_grad()
    def codes_of(self, tokens: Tokens) -> torch.Tensor:
        """The VQ codes ``[B, N]`` of encoder tokens (the frozen tokenizer, in eval mode)."""
        return self.quantize(tokens)[1]

    def _decoder(self) -> nn.Module:
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return base.get_decoder()

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """LM hidden states (after its final norm) over ``[prompt (left-padded), <boi>, codes]``."""
        b = input_ids.shape[0]
        text = self.lm.get_input_embeddings()(input_ids)
        image = self.code_embed(torch.cat([codes.new_full((b, 1), self.boi), codes], dim=1)).to(text.dtype)
        embeds = torch.cat([text, image], dim=1)
        mask = torch.cat([attention_mask.long(), attention_mask.new_ones(b, image.shape[1]).long()], dim=1)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self._decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def forward(self, tokens: Tokens, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> CodeLMOutput:
        """Teacher-forced: the codes of the images behind ``tokens`` given the left-padded prompts ``input_ids [B, T]``
        (``attention_mask`` 1 = real token)."""
        codes = self.codes_of(tokens)
        hidden = self._hidden(input_ids, attention_mask, codes)
        logits = self.code_head(hidden[:, input_ids.shape[1] :]).float()  # <boi>, c_1..c_N predict c_1..c_N, <eoi>
        targets = torch.cat([codes, codes.new_full((codes.shape[0], 1), self.eoi)], dim=1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return CodeLMOutput(loss=loss, logits=logits, codes=codes)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_codes: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``num_codes`` codes ``[B, N]`` after each left-padded prompt (``<eoi>`` excluded: an image has a
        fixed number of codes); ``temperature`` 0 is greedy. Re-runs the short sequence each step (no KV cache)."""
        b = input_ids.shape[0]
        codes = input_ids.new_zeros(b, 0)
        for _ in range(num_codes):
            logits = self.code_head(self._hidden(input_ids, attention_mask, codes)[:, -1]).float()[:, : self.eoi]
            if temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0].to(codes.device)
            codes = torch.cat([codes, nxt[:, None]], dim=1)
        return codes
