"""nonlocalnet: non-local neural networks (Wang, Girshick, Gupta, He, CVPR 2018) in PyTorch."""
from .layers import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalBlock
from .models.cost import estimate_cost

__version__ = "0.1.0"
__all__ = ["NonLocalBlock", "NonLocal1d", "NonLocal2d", "NonLocal3d", "estimate_cost", "__version__"]
