"""Projections between token spaces, behind one interface (`Tokens` in, `Tokens` out, `in_dim`/`out_dim`).

Note: AdapterHub's package also installs a top-level `adapters`; do not install both in one environment.
"""

from .base import Adapter
from .projections import LinearAdapter, MLPAdapter
from .registry import create_adapter, list_adapters, register_adapter

__all__ = ["Adapter", "LinearAdapter", "MLPAdapter", "create_adapter", "list_adapters", "register_adapter"]
