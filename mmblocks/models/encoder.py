"""`MMEncoder`: tokenizer -> backbone blocks -> [adapter_in -> LLMBlocks -> adapter_out] -> norm -> head."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenizers_mm import Tokens
from tokenizers_mm.detokenizers import RandomMask, keep_tokens, random_masking

from ..heads import PrefixLMHead
from ..layers.masks import padding_bias
from ..llm import LLMBlocks, set_lm_checkpointing
from ..params import parameter_table
from .base import Backbone, check_backbone

__all__ = ["LLMStage", "MMEncoder"]


class LLMStage(nn.Module):
    """``adapter_in -> LLMBlocks -> adapter_out``: the LLM blocks inside an encoder of another width.

    The center paper's wiring is two bias-free linears around one frozen block, with no residual around the stage.
    ``Tokens [B, N, d] -> [B, N, D_llm] -> [B, N, d]``.

    ``residual``: ``tokens + stage(tokens)`` with ``adapter_out``'s last linear layer zero-initialised, so the stage
    starts as the identity and the encoder as its baseline (not the center paper's wiring; an option).

    ``adapter_in_rms``: when set, `calibrate` rescales ``adapter_in`` on the first training batch so that its output
    has this RMS (e.g. the RMS of the LLM's own hidden states at the block's input, `mmblocks.analysis.text_rms`):
    a pretrained block's residual update is of the size of the states it was trained on, and swamps an input far
    smaller than them. The Trainer calls it once, on a fresh run (`CalibrationCallback`).
    """

    def __init__(
        self,
        adapter_in: nn.Module,
        blocks: LLMBlocks,
        adapter_out: nn.Module,
        adapter_in_rms: float | None = None,
        residual: bool = False,
    ):
        super().__init__()
        if adapter_in_rms is not None and not adapter_in_rms > 0:
            raise ValueError(f"adapter_in_rms must be > 0, got {adapter_in_rms}")
        self.adapter_in_rms = adapter_in_rms
        self.residual = bool(residual)
        if self.residual:  # the stage starts as the identity: tokens + 0
            last = [m for m in adapter_out.modules() if isinstance(m, nn.Linear)]
            if not last:
                raise ValueError(f"residual: {type(adapter_out).__name__} has no linear layer to zero-initialise")
            nn.init.zeros_(last[-1].weight)
            if last[-1].bias is not None:
                nn.init.zeros_(last[-1].bias)
        for name, a, want in (("adapter_in", adapter_in, "out_dim"), ("adapter_out", adapter_out, "in_dim")):
            width = getattr(a, want, None)
            if width is not None and width != blocks.hidden_size:
                raise ValueError(
                    f"{name}.{want}={width} must equal the LLM hidden size {blocks.hidden_size} ({blocks.family})"
                )
        self.adapter_in = adapter_in
        self.blocks = blocks
        self.adapter_out = adapter_out

    def forward(self, tokens: Tokens) -> Tokens:
        out = self.adapter_out(self.blocks(self.adapter_in(tokens)))
        if not self.residual:
            return out
        if out.x.shape != tokens.x.shape:
            raise ValueError(
                f"residual LLM stage: adapter_out gives {tuple(out.x.shape)} for input {tuple(tokens.x.shape)}; a "
                "residual needs the same tokens out as in (no pooling adapters)"
            )
        return out.with_x(tokens.x + out.x)

    @property
    def needs_calibration(self) -> bool:
        return self.adapter_in_rms is not None

    @torch.no_grad()
    def calibrate(self, tokens: Tokens) -> float:
        """Scale ``adapter_in``'s last linear layer (weight and bias) so that its output on `tokens` has RMS
        `adapter_in_rms` over the real tokens (averaged over ranks under DDP); returns the factor. The adapters'
        outputs are linear in their last layer, which is checked."""
        if self.adapter_in_rms is None:
            raise ValueError("LLMStage.calibrate needs adapter_in_rms")
        last = [m for m in self.adapter_in.modules() if isinstance(m, nn.Linear)]
        if not last:
            raise ValueError(f"adapter_in_rms: {type(self.adapter_in).__name__} has no linear layer to scale")
        before = _token_rms(self.adapter_in(tokens))
        factor = self.adapter_in_rms / max(before, 1e-12)
        last[-1].weight.mul_(factor)
        if last[-1].bias is not None:
            last[-1].bias.mul_(factor)
        after = _token_rms(self.adapter_in(tokens))
        if abs(after / self.adapter_in_rms - 1) > 1e-2:
            raise ValueError(
                f"adapter_in_rms: scaling the last linear layer of {type(self.adapter_in).__name__} by {factor:.4g} "
                f"gave output RMS {after:.4g}, not {self.adapter_in_rms:.4g}: its output is not linear in that layer"
            )
        return factor


def _token_rms(tokens: Tokens | torch.Tensor) -> float:
    """RMS over real tokens, averaged over ranks when a process group is up."""
    x = tokens.x if isinstance(tokens, Tokens) else tokens
    mask = tokens.mask if isinstance(tokens, Tokens) else None
    x = x.float()
    sq = (x[mask] if mask is not None else x.reshape(-1, x.shape[-1])).pow(2).mean()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sq)
        sq = sq / torch.distributed.get_world_size()
    return float(sq.sqrt())


class MMEncoder(nn.Module):
    """A modality encoder with LLM blocks inserted after backbone block `insert_at` (design §5).

    Args:
        tokenizer: raw input -> `Tokens` (e.g. `image_patches`).
        backbone: a `Backbone` (``blocks``, ``norm_pre``, ``norm``, ``prepare``, ``block_positions``: `TimmViT`,
            `PointTransformer`, `CausalViT`, any `BackboneBase`), or None.
        llm_stage: an `LLMStage`, or None for the baseline.
        head: a head on the final `Tokens` (e.g. `ClassifierHead`), or None for features only.
        insert_at: how many backbone blocks run before the LLM stage (default: all of them — after the last
            block, before the final norm, the center paper's place).
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        backbone: Backbone | None = None,
        llm_stage: LLMStage | None = None,
        head: nn.Module | None = None,
        insert_at: int | None = None,
    ):
        super().__init__()
        if backbone is not None:
            check_backbone(backbone)
        depth = len(backbone.blocks) if backbone is not None else 0
        insert_at = depth if insert_at is None else insert_at
        if not 0 <= insert_at <= depth:
            raise ValueError(f"insert_at must be in 0..{depth} (the backbone has {depth} blocks), got {insert_at}")
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.llm_stage = llm_stage
        self.head = head
        self.insert_at = insert_at
        self.grad_checkpointing = False
        self.frozen_stages: tuple[str, ...] = ()  # attribute names kept in eval mode (`freeze_stages`)

    def train(self, mode: bool = True) -> MMEncoder:
        """`nn.Module.train`, except that frozen stages stay in eval mode (no dropout, drop-path, BatchNorm updates)."""
        super().train(mode)
        for name in self.frozen_stages:
            stage = getattr(self, name, None)
            if stage is not None:
                stage.eval()
        return self

    # ------------------------------------------------------------------ structure
    def layer_names(self) -> list[str]:
        """The execution order: ``block.0 .. block.{k-1}, llm, block.k, ...`` (indices of `forward_intermediates`)."""
        depth = len(self.backbone.blocks) if self.backbone is not None else 0
        names = [f"block.{i}" for i in range(depth)]
        if self.llm_stage is not None:
            names.insert(self.insert_at, "llm")
        return names

    def _layers(self) -> Iterator[tuple[str, nn.Module]]:
        for name in self.layer_names():
            yield name, self.llm_stage if name == "llm" else self.backbone.blocks[int(name.split(".")[1])]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone blocks in backward (non-reentrant); the LLM blocks have their own switch, and a
        prefix-LM head's LM layers theirs (`mmblocks.llm.set_lm_checkpointing`, in eval mode too)."""
        self.grad_checkpointing = enable
        if self.llm_stage is not None:
            self.llm_stage.blocks.set_gradient_checkpointing(enable)
        if isinstance(self.head, PrefixLMHead):
            set_lm_checkpointing(self.head.lm, enable)

    def _run(
        self, name: str, module: nn.Module, tokens: Tokens, pos: torch.Tensor | None, attn_mask: torch.Tensor | None
    ) -> Tokens:
        if name == "llm":
            return module(tokens)
        x = tokens.x
        if pos is not None:  # Point-BERT style: positions re-added before every backbone block
            if pos.shape != x.shape:
                raise ValueError(
                    f"backbone positions {tuple(pos.shape)} do not match the tokens {tuple(x.shape)}: a stage "
                    "before this block changed the token count or width"
                )
            x = x + pos
        if attn_mask is not None and attn_mask.shape[-1] != x.shape[1]:
            raise ValueError(
                f"the token mask covers {attn_mask.shape[-1]} tokens but block {name} gets {x.shape[1]}: a stage "
                "before it changed the token count"
            )
        args = (x,) if attn_mask is None else (x, attn_mask)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return tokens.with_x(checkpoint(module, *args, use_reentrant=False))
        return tokens.with_x(module(*args))

    def tokenize(self, inputs: torch.Tensor, mask: torch.Tensor | None = None, **extra: torch.Tensor) -> Tokens:
        """Raw input -> `Tokens`. ``mask`` (the loader's padding mask over points / samples / frames) and ``extra``
        (e.g. codec ``motion``) reach the tokenizer only when given, so image tokenizers keep their one argument."""
        if mask is None and not extra:
            return self.tokenizer(inputs)
        return self.tokenizer(inputs, mask=mask, **extra)

    def _start(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None,
        extra: dict[str, torch.Tensor],
        mask_ratio: float | None = None,
        mask_generator: torch.Generator | None = None,
    ) -> tuple[Tokens, torch.Tensor | None, RandomMask | None]:
        tokens = self.tokenize(inputs, mask, **extra)
        masking = None
        if mask_ratio is not None:  # MAE: the encoder sees only the visible grid tokens (positions already added)
            if getattr(self.backbone, "rope_embed", None) is not None:
                raise ValueError(
                    "mask_ratio: this backbone places its tokens with rotary positions over the full patch grid, "
                    "which the kept tokens no longer form; use a backbone with absolute positions (e.g. a timm ViT)"
                )
            tokens, masking = self._mask_tokens(tokens, mask_ratio, mask_generator)
        if self.backbone is None:
            return tokens, None, masking
        self.backbone.prepare(tokens)  # e.g. a causal ViT's 2D RoPE grid
        tokens = tokens.with_x(self.backbone.norm_pre(tokens.x))
        return tokens, self.backbone.block_positions(tokens), masking

    @staticmethod
    def _mask_tokens(tokens: Tokens, mask_ratio: float, generator: torch.Generator | None) -> tuple[Tokens, RandomMask]:
        # a padding mask travels with the kept tokens (padded tokens may be hidden or kept; the head scores real ones)
        b, n = tokens.batch_size, tokens.num_grid_tokens
        # a generator draws on its own device (the CPU for evaluation's fixed masks), then the noise moves
        noise = torch.rand(b, n, generator=generator, device=None if generator is not None else tokens.x.device)
        masking = random_masking(b, n, mask_ratio, noise=noise.to(tokens.x.device))
        return keep_tokens(tokens, masking.ids_keep), masking

    def _final_norm(self, tokens: Tokens) -> Tokens:
        if self.backbone is None:
            return tokens
        return tokens.with_x(self.backbone.norm(tokens.x))

    # ------------------------------------------------------------------ forward
    def forward_features(self, inputs: torch.Tensor, mask: torch.Tensor | None = None, **extra: torch.Tensor) -> Tokens:
        """Raw input (``[B, C, H, W]`` images, ``[B, P, 3 + C]`` points, ``[B, S]`` waveforms, ``[B, T, C, H, W]``
        frames; ``mask`` the loader's padding mask) -> final (normed) `Tokens`."""
        return self._features(inputs, mask, extra)[0]

    def _features(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None,
        extra: dict[str, torch.Tensor],
        mask_ratio: float | None = None,
        mask_generator: torch.Generator | None = None,
    ) -> tuple[Tokens, RandomMask | None]:
        tokens, pos, masking = self._start(inputs, mask, extra, mask_ratio, mask_generator)
        attn_mask = padding_bias(tokens)
        for name, module in self._layers():
            tokens = self._run(name, module, tokens, pos, attn_mask)
        return self._final_norm(tokens), masking

    def forward_head(self, tokens: Tokens) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this encoder has no head; use forward_features")
        return self.head(tokens)

    def forward(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_aux: bool = False,
        head_inputs: Mapping[str, Any] | None = None,
        mask_ratio: float | None = None,
        mask_generator: torch.Generator | None = None,
        **extra: torch.Tensor,
    ) -> Any:
        """Raw input -> head output (logits), or the final `Tokens` when there is no head.

        ``head_inputs``: keyword arguments of the head besides the tokens (a prefix-LM head's ``input_ids``,
        ``attention_mask``, ``labels``). ``return_aux=True`` returns ``(output, aux_loss)``: the auxiliary loss of
        this forward (the LLM stage's Control LLM divergence with ``tune="interpolate"``, a MoE router's balance loss;
        0.0 otherwise), which a `mmblocks.tasks.Task` adds to its loss. Both go through ``forward`` so that DDP and
        ``torch.compile`` wrappers pass them on.

        ``mask_ratio`` (masked reconstruction, MAE / Point-MAE): hide that share of the grid tokens right after the
        tokenizer (`tokenizers_mm.detokenizers.random_masking`, drawn from ``mask_generator`` when given, else the
        global RNG); the backbone and LLM stage see only the visible ones, and the head gets the draw as
        ``masking=``."""
        tokens, masking = self._features(inputs, mask, extra, mask_ratio, mask_generator)
        if head_inputs and self.head is None:
            raise ValueError(f"head_inputs {sorted(head_inputs)} given to an encoder without a head")
        if masking is not None:
            if self.head is None:
                raise ValueError("mask_ratio needs a head that takes masking= (e.g. reconstruction)")
            head_inputs = {**(head_inputs or {}), "masking": masking}
        out = self.head(tokens, **(head_inputs or {})) if self.head is not None else tokens
        if return_aux:
            return out, self.llm_stage.blocks.aux_loss if self.llm_stage is not None else 0.0
        return out

    def forward_intermediates(
        self,
        inputs: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        mask: torch.Tensor | None = None,
        **extra: torch.Tensor,
    ) -> tuple[Tokens, list[Tokens]]:
        """Final `Tokens` plus the outputs of the layers at `indices` (timm-style: an int takes the last n).

        Indices count layers in execution order (`layer_names()`), the LLM stage being one layer.
        """
        names = self.layer_names()
        if indices is None:
            take = list(range(len(names)))
        elif isinstance(indices, int):
            take = list(range(len(names) - indices, len(names)))
        else:
            take = [i + len(names) if i < 0 else i for i in indices]
        bad = [i for i in take if not 0 <= i < len(names)]
        if bad:
            raise IndexError(f"intermediate indices {bad} out of range for {len(names)} layers {names}")
        tokens, pos, _ = self._start(inputs, mask, extra)
        attn_mask = padding_bias(tokens)
        out: list[Tokens] = []
        for i, (name, module) in enumerate(self._layers()):
            tokens = self._run(name, module, tokens, pos, attn_mask)
            if i in take:
                out.append(self._final_norm(tokens) if norm else tokens)
        return self._final_norm(tokens), out

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def stages(self) -> list[tuple[str, nn.Module | None]]:
        llm = self.llm_stage
        backbone_blocks = self.backbone.blocks if self.backbone is not None else None
        norm = getattr(self.backbone, "norm", None) if self.backbone is not None else None
        return [
            ("tokenizer", self.tokenizer),
            ("backbone blocks", backbone_blocks),
            ("backbone other", self._backbone_other()),
            ("adapter_in", llm.adapter_in if llm else None),
            ("llm blocks", llm.blocks if llm else None),
            ("adapter_out", llm.adapter_out if llm else None),
            ("norm", norm),
            ("head", self.head),
        ]

    def _backbone_other(self) -> nn.Module | None:
        """The backbone's parameters outside its blocks and final norm and not shared with the tokenizer (the
        per-block position MLP of a point transformer, ...), as a module for the table; None when there are none."""
        if self.backbone is None:
            return None
        owned = (self.backbone.blocks, getattr(self.backbone, "norm", None), self.tokenizer)
        counted = {id(p) for m in owned if m is not None for p in m.parameters()}
        rest = [p for p in self.backbone.parameters() if id(p) not in counted]
        if not rest:
            return None
        holder = nn.Module()
        holder.params = nn.ParameterList(rest)
        return holder

    def parameter_table(self) -> str:
        """Trainable and frozen parameters per stage."""
        return parameter_table((name, module) for name, module in self.stages() if module is not None)
