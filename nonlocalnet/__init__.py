"""nonlocalnet: non-local neural networks (Wang, Girshick, Gupta, He, CVPR 2018) in PyTorch."""

from __future__ import annotations

from typing import Any

from .layers import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalBlock

__version__ = "0.1.0"
__all__ = [
    "NonLocalBlock",
    "NonLocal1d",
    "NonLocal2d",
    "NonLocal3d",
    "add_nonlocal",
    "swap_nonlocal",
    "estimate_cost",
    "__version__",
]

# model surgery and cost estimates live in nonlocalnet.models, which imports the model zoo: loaded on first use, so that
# ``import nonlocalnet`` stays as light as the layers
_LAZY = {
    "add_nonlocal": "nonlocalnet.models.insert",
    "swap_nonlocal": "nonlocalnet.models.swap",
    "estimate_cost": "nonlocalnet.models.cost",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nonlocalnet' has no attribute {name!r}")
