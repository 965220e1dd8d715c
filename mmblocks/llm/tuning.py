"""How the LLM layers are tuned: frozen, norm (FPT), lora (peft), full, random, gated, expand, interpolate, and the
controls of "do the pretrained weights help?": shuffled, random_matched (frozen, scale-matched) and scratch (trainable).

Every mode starts from a frozen stack and then opens exactly the parameters it names, so
`LLMBlocks.trainable_parameters()` is always the honest list for the optimizer.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.norms import open_norm_parameters
from .blocks import LLMBlocks, call_layer
from .discovery import RESIDUAL_OUT_NAMES, residual_outputs

__all__ = [
    "TUNE_MODES",
    "TuneMode",
    "apply_tuning",
    "GatedLayer",
    "InterpolatedLayer",
    "lora_target_modules",
    "lora_target_parameters",
    "scramble_weights",
]

TuneMode = Literal[
    "frozen",
    "norm",
    "lora",
    "full",
    "random",
    "shuffled",
    "random_matched",
    "scratch",
    "gated",
    "expand",
    "interpolate",
]
TUNE_MODES: tuple[str, ...] = get_args(TuneMode)

# The keyword arguments each mode accepts, with their defaults.
TUNE_KWARGS: dict[str, dict[str, Any]] = {
    "frozen": {},
    "random": {},
    "shuffled": {},
    "random_matched": {},
    "scratch": {},
    "norm": {},
    "full": {},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target": "attention"},
    "gated": {"gate": "scalar"},
    "expand": {"every": 1},
    "interpolate": {
        "merge": "lerp",
        "factor": 0.0,
        "train_factor": False,
        "loss": "mse",
        "loss_alpha": 1.0,
    },
}


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _check_kwargs(tune: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    allowed = TUNE_KWARGS[tune]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        hint = f"it accepts {sorted(allowed)}" if allowed else "it takes no options"
        raise TypeError(f"tune={tune!r} got unknown option(s) {unknown}: {hint}")
    return {**allowed, **kwargs}


def apply_tuning(blocks: LLMBlocks, tune: str, *, seed: int | None = None, **kwargs: Any) -> LLMBlocks:
    """Freeze everything, then open the parameters `tune` names (in place; returns `blocks`).

    ``seed``: the permutation / draw of ``shuffled`` and ``random_matched`` (None: `torch.initial_seed()`, the
    training seed, without advancing the global generator, so the other parts of a model are initialised as in the
    ``frozen`` arm of the same seed).
    """
    if tune not in TUNE_MODES:
        raise ValueError(f"tune must be one of {TUNE_MODES}, got {tune!r}")
    opts = _check_kwargs(tune, kwargs)
    _freeze(blocks)
    blocks.tune = tune
    if tune in ("frozen", "random"):
        blocks._always_eval = list(blocks.layers) + [blocks.final_norm]
    elif tune in ("shuffled", "random_matched"):
        scramble_weights(blocks, tune, seed=torch.initial_seed() if seed is None else seed)
        blocks._always_eval = list(blocks.layers) + [blocks.final_norm]
    elif tune == "scratch":  # the family's init (load_blocks), every parameter trained: the matched-capacity arm
        for p in blocks.parameters():
            p.requires_grad_(True)
    elif tune == "norm":
        open_norm_parameters(blocks.layers, blocks.final_norm)
    elif tune == "full":
        for p in blocks.parameters():
            p.requires_grad_(True)
    elif tune == "lora":
        _apply_lora(blocks, **opts)
    elif tune == "gated":
        _apply_gated(blocks, **opts)
    elif tune == "expand":
        _apply_expand(blocks, **opts)
    elif tune == "interpolate":
        _apply_interpolate(blocks, **opts)
    blocks.attention = blocks.attention  # re-apply the causal flags to any new copies
    blocks.train(blocks.training)
    return blocks


# ------------------------------------------------------------------------------------------------ controls
@torch.no_grad()
def scramble_weights(blocks: LLMBlocks, how: str, seed: int = 0) -> LLMBlocks:
    """Destroy the learned structure of the pretrained weights and keep their scale (in place).

    ``shuffled``: each parameter tensor's entries permuted (one fixed-seed permutation per tensor): the same multiset
    of values, so the same mean, std, outliers and norm-gain magnitudes, with no learned arrangement.
    ``random_matched``: each tensor drawn from a Gaussian with that tensor's own mean and std (a one-entry tensor keeps
    its value). Unlike ``tune: random`` (the family's init, std 0.02, whose residual update is tiny next to the
    pretrained block's), both keep the block's update at the pretrained block's scale, so they separate "pretrained
    weights help" from "a large frozen nonlinearity helps". Rotary frequencies and other buffers are untouched.
    """
    if how not in ("shuffled", "random_matched"):
        raise ValueError(f"scramble_weights: how must be 'shuffled' or 'random_matched', got {how!r}")
    gen = torch.Generator().manual_seed(int(seed))
    modules = list(blocks.layers) + [blocks.final_norm]
    seen: set[int] = set()
    for module in modules:
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            flat = p.detach().reshape(-1).float().cpu()
            if how == "shuffled":
                new = flat[torch.randperm(flat.numel(), generator=gen)]
            elif flat.numel() > 1:
                new = torch.randn(flat.numel(), generator=gen) * flat.std() + flat.mean()
            else:
                new = flat
            p.copy_(new.reshape(p.shape).to(p.dtype))
    return blocks


# ------------------------------------------------------------------------------------------------ lora
def _is_linear(m: nn.Module) -> bool:
    """A linear layer peft can wrap: `nn.Linear` (subclasses such as Falcon's included) or GPT-2's `Conv1D`. A router
    that subclasses `nn.Linear` but returns a tuple (Llama 4's, PhiMoE's ``*Router``) is not one: peft's wrapper
    expects a tensor."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, Conv1D):
        return True
    return isinstance(m, nn.Linear) and ("Router" not in type(m).__name__ or type(m).forward is nn.Linear.forward)


def lora_target_modules(blocks: LLMBlocks, target: str) -> list[str]:
    """Exact module names (relative to `blocks.layers`) that LoRA wraps for `target`.

    Names are complete paths, never name fragments, so nothing outside the chosen sub-layer is touched.
    """
    spec = blocks.spec
    if target == "attention":
        roots = (spec.attn,)
    elif target == "mlp":
        roots = spec.mlp
    elif target == "all-linear":
        roots = ("",)
    else:
        raise ValueError(f"LoRA target must be 'attention', 'mlp' or 'all-linear', got {target!r}")
    names = []
    for name, m in blocks.layers.named_modules():
        if not _is_linear(m):
            continue
        inner = name.split(".", 1)[1] if "." in name else ""
        if any(r == "" or inner == r or inner.startswith(r + ".") for r in roots):
            names.append(name)
    if not names and not lora_target_parameters(blocks, target):
        raise ValueError(f"no linear layers found for LoRA target {target!r} in family {spec.model_type}")
    return names


def lora_target_parameters(blocks: LLMBlocks, target: str) -> list[str]:
    """Weight tensors outside `nn.Linear` modules that LoRA adapts through peft's ``target_parameters``: fused
    mixture-of-experts tensors (``mlp.experts.gate_up_proj [E, 2I, D]``, ``down_proj``) and routers held as a bare
    weight, under the roots of `target` (names relative to `blocks.layers`)."""
    spec = blocks.spec
    roots = {"attention": (spec.attn,), "mlp": spec.mlp, "all-linear": ("",)}.get(target, ())
    out = []
    for name, p in blocks.layers.named_parameters():
        owner = blocks.layers.get_submodule(name.rsplit(".", 1)[0])
        if _is_linear(owner) or p.dim() < 2 or "lora_" in name:
            continue
        inner = name.split(".", 1)[1]
        if any(r == "" or inner.startswith(r + ".") for r in roots) and p.dim() == 3:
            out.append(name)
    return out


def _apply_lora(blocks: LLMBlocks, r: int, alpha: float, dropout: float, target: str) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_target_modules(blocks, target)
    params = lora_target_parameters(blocks, target)
    conv1d = any(isinstance(blocks.layers.get_submodule(t), Conv1D) for t in targets)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        target_parameters=params or None,
        bias="none",
        fan_in_fan_out=conv1d,
    )
    inject_adapter_in_model(config, blocks.layers)
    for name, p in blocks.layers.named_parameters():
        p.requires_grad_("lora_" in name)


# ------------------------------------------------------------------------------------------------ gated
class GatedLayer(nn.Module):
    """``x + tanh(g) * (layer(x) - x)`` with ``g`` zero-initialised: the identity at init (LLaMA-Adapter's
    zero-init gating applied to the whole layer update). The wrapped layer stays frozen.

    Args:
        layer: a `transformers` layer.
        hidden_size: ``D``, for a per-channel gate.
        gate: ``"scalar"`` (one gate) or ``"channel"`` (one gate per channel, shape ``[D]``).
    """

    def __init__(self, layer: nn.Module, hidden_size: int, gate: str = "scalar"):
        super().__init__()
        if gate not in ("scalar", "channel"):
            raise ValueError(f"gate must be 'scalar' or 'channel', got {gate!r}")
        self.layer = layer
        self.gate = nn.Parameter(torch.zeros(1 if gate == "scalar" else hidden_size))

    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        update = call_layer(self.layer, hidden, kwargs) - hidden
        return hidden + torch.tanh(self.gate).to(update.dtype) * update


def _apply_gated(blocks: LLMBlocks, gate: str) -> None:
    frozen = list(blocks.layers)
    blocks.layers = nn.ModuleList(GatedLayer(layer, blocks.hidden_size, gate) for layer in frozen)
    blocks._always_eval = frozen + [blocks.final_norm]


# ------------------------------------------------------------------------------------------------ expand
def _zero_residual_outputs(layer: nn.Module, names: tuple[str, ...]) -> None:
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].zero_()


def _identity_error(blocks: LLMBlocks, layer: nn.Module, layer_type: str) -> float:
    """How far a zeroed copy moves a random input (0 for a pre-norm layer: x + 0 + 0)."""
    p = next(layer.parameters())
    x = torch.randn(1, 5, blocks.hidden_size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    kwargs = blocks.layer_kwargs(1, 5, None, p.device, p.dtype)[layer_type]
    was = layer.training
    layer.eval()
    with torch.no_grad():
        out = call_layer(layer, x, kwargs)
    layer.train(was)
    return float((out - x).abs().max() / x.abs().max())


def _apply_expand(blocks: LLMBlocks, every: int) -> None:
    spec = blocks.spec
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"expand option `every` must be a positive int, got {every!r}")
    new_layers, new_indices, new_types, frozen = [], [], [], []
    for pos, (layer, idx, ltype) in enumerate(zip(blocks.layers, blocks.layer_indices, blocks.layer_types)):
        new_layers.append(layer)
        new_indices.append(idx)
        new_types.append(ltype)
        frozen.append(layer)
        if (pos + 1) % every == 0:
            twin = copy.deepcopy(layer)
            outputs = residual_outputs(twin)
            if not outputs:
                raise ValueError(
                    f"tune='expand' needs pre-norm layers whose residual-stream outputs can be zeroed; layer {idx} of "
                    f"{spec.model_type} has no projection named like one ({', '.join(sorted(RESIDUAL_OUT_NAMES))})"
                )
            _zero_residual_outputs(twin, outputs)
            err = _identity_error(blocks, twin, ltype)
            if err > 1e-5:
                raise ValueError(
                    f"tune='expand' needs pre-norm layers whose residual-stream outputs can be zeroed; in "
                    f"{spec.model_type}, a copy of layer {idx} with {list(outputs)} zeroed still changes its "
                    f"input (max relative change {err:.2g}): the layer normalises the residual stream (post-norm) or "
                    "writes into it through another path, so the copy is not the identity"
                )
            for p in twin.parameters():
                p.requires_grad_(True)
            new_layers.append(twin)
            new_indices.append(None)
            new_types.append(ltype)
    # Renumber layer_idx as LLaMA Pro must, so a KV cache could never mix two layers up.
    for i, layer in enumerate(new_layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    blocks.layers = nn.ModuleList(new_layers)
    blocks.layer_indices = new_indices
    blocks.layer_types = new_types
    blocks._always_eval = frozen + [blocks.final_norm]


# ------------------------------------------------------------------------------------------------ interpolate
class InterpolatedLayer(nn.Module):
    """Control LLM: a frozen layer and a trainable side-car copy run on the same input, merged.

    ``merge``: ``lerp`` (``h = lerp(h_pre, h_exp, sigmoid(a))``, ``a`` = `factor`), ``slerp`` (spherical
    interpolation of the two states, lerp for small angles) or ``dlerp`` (token-wise weight
    ``sigmoid(Linear([h_pre, h_exp]))``, bias = `factor`, weight zero-initialised). The divergence between
    ``h_pre`` (detached) and ``h_exp`` (``mse`` or ``cosine``, times `loss_alpha`) is left in `last_aux_loss`.
    At init the copy equals the frozen layer, so the output equals the frozen layer's.
    """

    def __init__(
        self,
        layer: nn.Module,
        hidden_size: int,
        merge: str = "lerp",
        factor: float = 0.0,
        train_factor: bool = False,
        loss: str = "mse",
        loss_alpha: float = 1.0,
    ):
        super().__init__()
        if merge not in ("lerp", "slerp", "dlerp"):
            raise ValueError(f"interpolate merge must be 'lerp', 'slerp' or 'dlerp', got {merge!r}")
        if loss not in ("mse", "cosine"):
            raise ValueError(f"interpolate loss must be 'mse' or 'cosine', got {loss!r}")
        self.layer = layer
        self.sidecar = copy.deepcopy(layer)
        for p in self.sidecar.parameters():
            p.requires_grad_(True)
        self.merge = merge
        self.loss = loss
        self.loss_alpha = float(loss_alpha)
        if merge == "dlerp":
            self.weight_proj = nn.Linear(2 * hidden_size, 1)
            nn.init.zeros_(self.weight_proj.weight)
            nn.init.constant_(self.weight_proj.bias, factor)
        else:
            self.factor = nn.Parameter(torch.tensor(float(factor)), requires_grad=train_factor)
        self.last_aux_loss: torch.Tensor | None = None

    def _merge(self, pre: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        if self.merge == "dlerp":
            w = torch.sigmoid(self.weight_proj(torch.cat([pre, exp], dim=-1).to(self.weight_proj.weight.dtype)))
            return pre + w.to(pre.dtype) * (exp - pre)
        t = torch.sigmoid(self.factor).to(pre.dtype)
        if self.merge == "lerp":
            return pre + t * (exp - pre)
        # slerp on the directions; weights applied to the states themselves, lerp where the angle is tiny
        a, b = F.normalize(pre.float(), dim=-1), F.normalize(exp.float(), dim=-1)
        dot = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-6, 1 - 1e-6)
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        tf = t.float()
        w0 = torch.sin((1 - tf) * theta) / sin_theta
        w1 = torch.sin(tf * theta) / sin_theta
        small = sin_theta < 1e-3
        w0 = torch.where(small, 1 - tf, w0).to(pre.dtype)
        w1 = torch.where(small, tf.expand_as(w1), w1).to(pre.dtype)
        return w0 * pre + w1 * exp

    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        pre = call_layer(self.layer, hidden, kwargs)
        exp = call_layer(self.sidecar, hidden, kwargs)
        target = pre.detach()
        if self.loss == "mse":
            div = F.mse_loss(exp.float(), target.float())
        else:
            div = (1 - F.cosine_similarity(exp.float(), target.float(), dim=-1)).mean()
        self.last_aux_loss = self.loss_alpha * div
        return self._merge(pre, exp)


def _apply_interpolate(blocks: LLMBlocks, **opts: Any) -> None:
    frozen = list(blocks.layers)
    blocks.layers = nn.ModuleList(InterpolatedLayer(layer, blocks.hidden_size, **opts) for layer in frozen)
    blocks._always_eval = frozen + [blocks.final_norm]
