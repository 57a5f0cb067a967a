"""Whether a compiler or a tracer is recording the call: the layers' own CPU paths (oneDNN convolutions, the
channels-last max-pool, the dense path's backward) then step aside for torch's operators, which every compiler and
exporter knows."""

from __future__ import annotations

import torch


def capturing() -> bool:
    """True under ``torch.compile`` / ``torch.export`` (dynamo), ``torch.jit.trace`` and ``torch.jit.script``. It
    asks dynamo first, so that nothing after it in a caller's check is traced."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
