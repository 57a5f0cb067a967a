"""A checksum of a file's content (tensors, numbers, strings, containers), written inside the file and verified on
read: training checkpoints (:mod:`nonlocalnet.engine.checkpoint`) and weights files
(:func:`nonlocalnet.models.checkpoints.weights.save_weights`) carry one."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

CHECKSUM_KEY = "checksum"  # the entry of a checkpoint (and the metadata key of a safetensors file) holding it


def state_checksum(state: Any) -> str:
    """The SHA-256 of a checkpoint's content (its ``checksum`` entry left out): every tensor's dtype, shape and
    bytes, every number, string and key, walked in a fixed order.

    It is computed over the content rather than the file's bytes so that it can travel inside the file: torch's
    zip reader does not check its CRCs, so a byte flipped inside a tensor would otherwise load without a word.
    """
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            digest.update(b"{")
            for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
                if key == CHECKSUM_KEY and value is state:
                    continue
                digest.update(f"{type(key).__name__}:{key!r}=".encode())
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[" if isinstance(value, list) else b"(")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(state)
    return digest.hexdigest()
