"""Projections between token spaces, behind one interface (`Tokens` in, `Tokens` out, `in_dim`/`out_dim`).

Token-count preserving: ``linear`` (the center paper's mappers), ``mlp`` (LLaVA). Token-count changing: ``pool``
(InfMLLM / Open-Qwen2VL average pooling on the token grid), ``pixel_shuffle`` (Idefics3 space-to-depth),
``frame_stack`` (SLAM-LLM's speech projector), ``perceiver`` (Flamingo's resampler), ``qformer`` (BLIP-2).

Note: AdapterHub's package also installs a top-level `adapters`; do not install both in one environment.
"""

from .base import Adapter
from .frame_stack import FrameStackAdapter
from .perceiver import PerceiverAdapter
from .pixel_shuffle import PixelShuffleAdapter
from .pool import PoolAdapter, pool_grid
from .projections import LinearAdapter, MLPAdapter
from .qformer import QFormer
from .registry import create_adapter, list_adapters, register_adapter

__all__ = [
    "Adapter",
    "FrameStackAdapter",
    "LinearAdapter",
    "MLPAdapter",
    "PerceiverAdapter",
    "PixelShuffleAdapter",
    "PoolAdapter",
    "QFormer",
    "create_adapter",
    "list_adapters",
    "pool_grid",
    "register_adapter",
]
