"""The non-local block (Wang et al., CVPR 2018), every instantiation of the paper in one module.

    y_i = 1/C(x) * sum_j f(x_i, x̂_j) g(x̂_j)        z_i = Norm(W_z y_i) + x_i

The maths lives in ``pairwise*.py`` (a dense reference and exact fast paths); this module owns the weights:
the 1x1 projections θ, φ, g, the output transform W_z and its norm, the max-pool subsampling of x̂, and the
folding that restricts which keys each query sees.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor, nn

from .folding import EXTENTS, Folding, check_folding, fold, scatter_attention, unfold
from .pairwise import MODES, check_mode_impl, compute_dtype, dense_pairwise, pairwise, resolve_impl

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
NORMS = ("batch", "layer", None)
SUBSAMPLE_POSITIONS = ("input", "projection")
INIT_STD = 0.01  # the official code's init of θ, φ, g and W_z
INITS = ("official", "pytorch")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, *spatial) map, as the feature-bank follow-up uses."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = x.movedim(1, -1)  # (B, C, *S) -> (B, *S, C)
        y = nn.functional.layer_norm(y, y.shape[-1:], self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)  # (B, *S, C) -> (B, C, *S)


class NonLocalBlock(nn.Module):
    """A residual non-local block for sequences (dim=1), images (dim=2) or videos (dim=3).

    Args:
        in_channels: C, channels of the input x (and of the output z).
        dim: number of spatial axes of x: 1 (B, C, L), 2 (B, C, H, W) or 3 (B, C, T, H, W).
        mode: the pairwise function f and normaliser C(x): "gaussian" (exp(x_iᵀx_j) on raw features, softmax),
            "embedded_gaussian" (exp(θ_iᵀφ_j), softmax: self-attention), "dot_product" (θ_iᵀφ_j / M) or
            "concatenation" (ReLU(w_fᵀ[θ_i, φ_j]) / M).
        inter_channels: C', channels of θ, φ and g (default C // 2).
        subsample: max-pool kernel (= stride) applied on the key/value path x̂, an int or one per spatial axis;
            None for no subsampling. The paper uses (1, 2, 2) for videos.
        subsample_position: "input" pools x̂ before the φ and g convs (the official code), "projection" pools
            their outputs (mmcv, AlexHex7). Both give the same shapes; the choice matters for loading weights.
        scale: multiplier s of the pairwise term: None (the paper, s = 1), "auto" (C'^-0.5, the official code)
            or a positive number.
        norm: the norm after W_z: "batch" (BatchNorm with γ = 0 at init), "layer" (LayerNorm over channels
            with γ = 0 at init) or None (no norm; W_z itself zero at init, for frozen-BN models).
        extent: which keys each query sees (videos): "spacetime" (all), "space" (same frame) or "time" (same
            spatial position across frames), Table 2(d).
        temporal_groups: attend only within groups of this many consecutive frames (the official memory saver
            for 128-frame clips); 1 = no grouping.
        memory_channels: channels of a ``memory`` tensor that supplies x̂ instead of x (a feature bank);
            None = same as ``in_channels``.
        impl: which exact path computes the pairwise step: "auto", "dense", "sdpa", "chunked" (softmax modes),
            "linear" (dot product), "sorted" (concatenation). See :mod:`nonlocalnet.layers.pairwise`.
        init: "official" (N(0, 0.01²) projections, for pretrained networks) or "pytorch" (PyTorch's default
            conv init, for small networks trained from scratch); see :meth:`reset_parameters`.
    """

    def __init__(self, in_channels: int, *, dim: int = 3, mode: str = "embedded_gaussian",
                 inter_channels: int | None = None, subsample: int | Sequence[int] | None = None,
                 subsample_position: str = "input", scale: None | float | str = None, norm: str | None = "batch",
                 extent: str = "spacetime", temporal_groups: int = 1, memory_channels: int | None = None,
                 impl: str = "auto", init: str = "official") -> None:
        super().__init__()
        if dim not in _CONV:
            raise ValueError(f"dim must be 1, 2 or 3 (sequences, images, videos); got {dim!r}")
        check_mode_impl(mode, impl)
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int; got {in_channels!r}")
        inter_channels = max(1, in_channels // 2) if inter_channels is None else inter_channels
        if not isinstance(inter_channels, int) or inter_channels < 1:
            raise ValueError(f"inter_channels must be a positive int; got {inter_channels!r}")
        if subsample_position not in SUBSAMPLE_POSITIONS:
            raise ValueError(f"unknown subsample_position {subsample_position!r}; expected 'input' or 'projection'")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected 'batch', 'layer' or None")
        if extent not in EXTENTS:
            raise ValueError(f"unknown extent {extent!r}; expected one of {', '.join(EXTENTS)}")
        if extent != "spacetime" and dim != 3:
            raise ValueError(f"extent={extent!r} needs video input (dim=3); got dim={dim}")
        if not isinstance(temporal_groups, int) or temporal_groups < 1:
            raise ValueError(f"temporal_groups must be a positive int; got {temporal_groups!r}")
        if temporal_groups > 1 and (dim != 3 or extent != "spacetime"):
            raise ValueError("temporal_groups > 1 needs video input (dim=3) and extent='spacetime'")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(map(repr, INITS))}")
        memory_channels = in_channels if memory_channels is None else memory_channels
        if mode == "gaussian" and memory_channels != in_channels:
            raise ValueError(f"the gaussian mode compares raw features, so memory_channels ({memory_channels}) "
                             f"must equal in_channels ({in_channels})")

        self.in_channels = in_channels
        self.inter_channels = inter_channels
        self.memory_channels = memory_channels
        self.dim = dim
        self.mode = mode
        self.impl = impl
        self.subsample = _parse_subsample(subsample, dim)
        self.subsample_position = subsample_position
        self.scale = _parse_scale(scale, inter_channels)
        self.norm_type = norm
        self.extent = extent
        self.temporal_groups = temporal_groups
        self.init = init

        conv = _CONV[dim]
        if mode != "gaussian":
            self.theta = conv(in_channels, inter_channels, kernel_size=1)
            self.phi = conv(memory_channels, inter_channels, kernel_size=1)
        self.g = conv(memory_channels, inter_channels, kernel_size=1)
        if mode == "concatenation":
            # w_f: 2C' -> 1 over each concatenated pair [θ_i, φ_j]; a 2D conv over the (N, M) pair map
            self.concat_project = nn.Sequential(nn.Conv2d(2 * inter_channels, 1, kernel_size=1, bias=False),
                                                nn.ReLU())
        self.out = conv(inter_channels, in_channels, kernel_size=1)
        if norm == "batch":
            self.norm = _BATCHNORM[dim](in_channels, eps=1e-5, momentum=0.1)
        elif norm == "layer":
            self.norm = ChannelLayerNorm(in_channels)
        else:
            self.norm = nn.Identity()
        self.pool = _MAXPOOL[dim](self.subsample, self.subsample) if self.subsample is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises the block so that it starts as the identity.

        ``init="official"``: θ, φ, g, W_z (and w_f) ~ N(0, 0.01²), biases 0, as the official code, made for
        inserting blocks into a pretrained network. ``init="pytorch"``: PyTorch's default conv init (as
        AlexHex7's port), whose larger θ/φ/g let a small network trained from scratch find the pairwise
        interactions quickly; the official init's tiny products stall the dot-product and concatenation modes.
        Either way the output starts at zero (γ = 0, or W_z = 0 without a norm).
        """
        projections = [self.g, self.out] + ([] if self.mode == "gaussian" else [self.theta, self.phi])
        if self.mode == "concatenation":
            projections.append(self.concat_project[0])
        for conv in projections:
            if self.init == "official":
                nn.init.normal_(conv.weight, std=INIT_STD)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
            else:
                conv.reset_parameters()
        if self.norm_type is None:
            nn.init.zeros_(self.out.weight)  # no norm to start at zero: W_z itself does
            nn.init.zeros_(self.out.bias)
        else:
            nn.init.zeros_(self.norm.weight)  # γ = 0
            nn.init.zeros_(self.norm.bias)

    def forward(self, x: Tensor, memory: Tensor | None = None,
                return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """z = Norm(W_z y) + x.

        Args:
            x: (B, C, *spatial) with ``dim`` spatial axes.
            memory: optional (B, memory_channels, *spatial_m) tensor supplying x̂ (keys and values) instead
                of x, with the same number of axes as x.
            return_attention: also return the normalised pairwise weights f/C(x) as (B, N, M), N the query
                positions and M the key positions (after subsampling), both flattened in (t, h, w) order;
                zero outside the extent / temporal groups. Computed densely, only when asked.

        Returns:
            z with the shape of x, or (z, weights).
        """
        self._check_inputs(x, memory)
        source = x if memory is None else memory  # x̂ before any pooling
        query = x if self.mode == "gaussian" else self.theta(x)  # (B, Cq, *S)
        if self.pool is not None and self.subsample_position == "input":
            source = self.pool(source)  # (B, C, *S')
        key = source if self.mode == "gaussian" else self.phi(source)  # (B, Cq, *S')
        value = self.g(source)  # (B, C', *S')
        if self.pool is not None and self.subsample_position == "projection":
            key = self.pool(key) if self.mode != "gaussian" else key
            value = self.pool(value)
            if self.mode == "gaussian":
                key = self.pool(source)
        query_spatial = tuple(query.shape[2:])
        key_spatial = tuple(key.shape[2:])
        folding = self._folding(query_spatial)
        check_folding(folding, query_spatial, key_spatial)

        q = fold(query, folding)  # (B', N, Cq)
        k = fold(key, folding)  # (B', M, Cq)
        v = fold(value, folding)  # (B', M, C')
        dtype = compute_dtype(q, k, v)
        with _no_autocast(x.device.type):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            if return_attention:
                y, weights = dense_pairwise(q, k, v, self.mode, self.scale, self._concat_project())
            else:
                impl = resolve_impl(self.mode, self.impl, q.shape[1], k.shape[1], q.shape[2], v.shape[2],
                                    q.device.type, q.shape[0])
                y = pairwise(q, k, v, self.mode, self.scale, impl, self._concat_project())
        # unfold's transposed view would make z channels-last-strided; keep the input's layout for the convs after
        y = unfold(y.to(value.dtype), folding, x.shape[0], query_spatial).contiguous()  # (B, C', *S)
        z = self.norm(self.out(y)) + x
        if return_attention:
            return z, scatter_attention(weights, folding, x.shape[0], query_spatial, key_spatial)
        return z

    def _folding(self, query_spatial: tuple[int, ...]) -> Folding:
        """The folding for this input: temporal groups of k frames become T/k independent problems."""
        k = self.temporal_groups
        if self.extent != "spacetime" or k == 1:
            return Folding(self.extent, 1)
        frames = query_spatial[0]
        if frames % k:
            raise ValueError(f"temporal_groups={k} frames per group must divide the clip's {frames} frames "
                             f"(input spatial size {tuple(query_spatial)})")
        return Folding("spacetime", frames // k)

    def _concat_project(self) -> nn.Sequential | None:
        return self.concat_project if self.mode == "concatenation" else None

    def _check_inputs(self, x: Tensor, memory: Tensor | None) -> None:
        expected = self.dim + 2
        names = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}[self.dim]
        if x.dim() != expected:
            raise ValueError(f"NonLocalBlock(dim={self.dim}) expects x of shape {names}; got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"NonLocalBlock was built for {self.in_channels} input channels; "
                             f"x has {x.shape[1]} (shape {tuple(x.shape)})")
        if memory is None:
            if self.memory_channels != self.in_channels:
                raise ValueError(f"this block takes keys/values from a memory of {self.memory_channels} channels; "
                                 f"pass memory=")
            source = x
        else:
            if memory.dim() != expected:
                raise ValueError(f"memory must have the same number of axes as x, {names}; "
                                 f"got {tuple(memory.shape)}")
            if memory.shape[0] != x.shape[0]:
                raise ValueError(f"memory batch size {memory.shape[0]} differs from x's {x.shape[0]}")
            if memory.shape[1] != self.memory_channels:
                raise ValueError(f"memory has {memory.shape[1]} channels; this block was built for "
                                 f"memory_channels={self.memory_channels}")
            if self.extent != "spacetime" or self.temporal_groups != 1:
                raise ValueError("memory= attends over another tensor: use extent='spacetime' and "
                                 "temporal_groups=1")
            source = memory
        if self.subsample is not None:
            spatial = tuple(source.shape[2:])
            if any(k > s for k, s in zip(self.subsample, spatial)):
                raise ValueError(f"subsample {self.subsample} is larger than the key/value input's spatial size "
                                 f"{spatial}")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, dim={self.dim}, mode={self.mode!r}, inter_channels={self.inter_channels}, "
                f"subsample={self.subsample}, subsample_position={self.subsample_position!r}, scale={self.scale}, "
                f"norm={self.norm_type!r}, extent={self.extent!r}, "
                f"temporal_groups={self.temporal_groups}, impl={self.impl!r}, init={self.init!r}")


def _no_autocast(device_type: str):
    """Disables autocast around the pairwise step; a no-op on devices autocast does not know (meta)."""
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class NonLocal1d(NonLocalBlock):
    """:class:`NonLocalBlock` for sequences (B, C, L)."""

    def __init__(self, in_channels: int, **options) -> None:
        super().__init__(in_channels, dim=1, **options)


class NonLocal2d(NonLocalBlock):
    """:class:`NonLocalBlock` for images (B, C, H, W)."""

    def __init__(self, in_channels: int, **options) -> None:
        super().__init__(in_channels, dim=2, **options)


class NonLocal3d(NonLocalBlock):
    """:class:`NonLocalBlock` for videos (B, C, T, H, W)."""

    def __init__(self, in_channels: int, **options) -> None:
        super().__init__(in_channels, dim=3, **options)


def _parse_subsample(subsample: int | Sequence[int] | None, dim: int) -> tuple[int, ...] | None:
    if subsample is None:
        return None
    kernel = (subsample,) * dim if isinstance(subsample, int) else tuple(subsample)
    if len(kernel) != dim or not all(isinstance(k, int) and k >= 1 for k in kernel):
        raise ValueError(f"subsample must be a positive int or {dim} positive ints (one per spatial axis); "
                         f"got {subsample!r}")
    return None if all(k == 1 for k in kernel) else kernel


def _parse_scale(scale: None | float | str, inter_channels: int) -> float:
    if scale is None:
        return 1.0
    if scale == "auto":
        return inter_channels ** -0.5
    if isinstance(scale, str) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be None, 'auto' or a positive number; got {scale!r}")
    return float(scale)
