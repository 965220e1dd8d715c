"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models whose LM is far larger than their encoder.

Under ``torchrun`` with ``train.fsdp: true`` the `Trainer` shards the model instead of wrapping it in DDP: each decoder
layer of a prefix-LM head's LM and of the LLM stage's blocks is its own unit (its parameters gathered for its forward
and backward only), the rest of the model one root unit. Frozen LM weights are sharded too (FSDP2 shards per
parameter, so trainable and frozen parameters mix freely). Works on CUDA (NCCL) and on CPU (gloo).

Checkpoints stay the format of a single process: the trainable weights and the optimizer state are gathered to full
tensors on rank 0 (`torch.distributed.checkpoint.state_dict`) and loaded back into the shards on every rank: the
weights are those of any run (`mmblocks eval`, ``model.init``), and an FSDP run resumes under FSDP (its optimizer
state is keyed by parameter name).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "apply_fsdp",
    "fsdp_full_optimizer_state",
    "fsdp_full_trainable_state",
    "fsdp_load_optimizer_state",
    "fsdp_load_trainable_state",
    "fsdp_trainable_names",
    "fsdp_units",
    "fsdp_unsharded",
    "is_fsdp",
]


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units of their own: the decoder layers of every prefix-LM head's LM and of the LLM
    stage (the root takes everything else)."""
    from ..heads import PrefixLMHead
    from ..llm import LLMBlocks, lm_layers

    units: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, PrefixLMHead):
            units += list(lm_layers(module.lm))
        elif isinstance(module, LLMBlocks):
            units += list(module.layers)
    return units


def apply_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard `model` in place over all ranks of the default process group (`fsdp_units`, then the root); returns it.
    Create the optimizer afterwards: the parameters become sharded `DTensor`s."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs torch.distributed initialised (run under torchrun)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def fsdp_trainable_names(model: nn.Module) -> list[str]:
    """What a checkpoint holds of the model: its trainable parameters and persistent buffers (as
    `mmblocks.train.trainable_state_dict`)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = [n for n in model.state_dict() if n not in params]
    return [n for n, p in model.named_parameters() if p.requires_grad] + buffers


def fsdp_full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and persistent buffers as full CPU tensors on rank 0 (an empty dict elsewhere); only
    these are gathered, never the frozen LM. Collective: every rank must call it, in the same order."""
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    out = {}
    for name in fsdp_trainable_names(model):
        t = tensors[name].detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t  # a sharded DTensor: all-gathered
        if main:
            out[name] = t.cpu()
    return out


def fsdp_load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy full tensors (every rank holds them, e.g. read from a checkpoint) into the sharded model; the frozen
    parameters it lacks keep their values."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(state), options=_full_options(strict=False))


def fsdp_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state gathered to full tensors on rank 0 (keyed by parameter name). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def fsdp_load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, dict(state), options=_full_options())


@contextmanager
def fsdp_unsharded(model: nn.Module) -> Iterator[None]:
    """Every unit's parameters gathered and kept so for the block (evaluation calls `forward_features` and the LM's
    `generate`, which do not go through the root's forward); resharded after."""
    from torch.distributed.fsdp import FSDPModule

    # the inner units reshard after forward (fully_shard's default); the root does not, and keeps that setting
    inner = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for unit in inner:
        unit.set_reshard_after_forward(False, recurse=False)
    units = [*inner, model] if isinstance(model, FSDPModule) else inner
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)
