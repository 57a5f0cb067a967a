"""The non-local block (Wang et al., CVPR 2018), every instantiation of the paper in one module.

    y_i = 1/C(x) * sum_j f(x_i, x̂_j) g(x̂_j)        z_i = Norm(W_z y_i) + x_i

The maths lives in ``pairwise*.py`` (a dense reference and exact fast paths); this module owns the weights:
the 1x1 projections θ, φ, g, the output transform W_z and its norm, the max-pool subsampling of x̂, and the
folding that restricts which keys each query sees.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from . import conv as _conv
from .folding import (
    EXTENTS,
    Folding,
    check_folding,
    fold_positions,
    scatter_attention,
    to_map,
    to_positions,
    unfold_positions,
)
from .pairwise import check_mode_impl, memory_budget, pairwise_step, plan_impl
from .pooling import WindowMaxPool

_CONV = {1: _conv.Conv1d, 2: _conv.Conv2d, 3: _conv.Conv3d}  # nn.ConvNd on oneDNN where faster (conv.py)
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
NORMS = ("batch", "layer", None)
SUBSAMPLE_POSITIONS = ("input", "projection")
INIT_STD = 0.01  # the official code's init of θ, φ, g and W_z
INITS = ("auto", "official", "pytorch")


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
        memory_budget: bytes the dense path's N x M matrices may take when ``impl="auto"`` considers it; None
            (the default) takes the global setting (:func:`nonlocalnet.layers.set_memory_budget`), by default an
            eighth of the device's total memory.
        init: "auto" (the default: PyTorch's conv init, which a block trained from scratch needs, until weights
            of a pretrained network are loaded around the block, whose loaders then give it the official init;
            see :func:`init_inserted_blocks`), "official" (N(0, 0.01²) projections, the official code's, made for
            blocks inserted into a pretrained network) or "pytorch" (always PyTorch's default conv init). See
            :meth:`reset_parameters`.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        dim: int = 3,
        mode: str = "embedded_gaussian",
        inter_channels: int | None = None,
        subsample: int | Sequence[int] | None = None,
        subsample_position: str = "input",
        scale: None | float | str = None,
        norm: str | None = "batch",
        extent: str = "spacetime",
        temporal_groups: int = 1,
        memory_channels: int | None = None,
        impl: str = "auto",
        memory_budget: int | None = None,
        init: str = "auto",
    ) -> None:
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
        if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0
        ):
            raise ValueError(f"memory_budget must be a number of bytes (an int >= 0) or None; got {memory_budget!r}")
        memory_channels = in_channels if memory_channels is None else memory_channels
        if mode == "gaussian" and memory_channels != in_channels:
            raise ValueError(
                f"the gaussian mode compares raw features, so memory_channels ({memory_channels}) "
                f"must equal in_channels ({in_channels})"
            )

        self.in_channels = in_channels
        self.inter_channels = inter_channels
        self.memory_channels = memory_channels
        self.dim = dim
        self.mode = mode
        self.impl = impl
        self.memory_budget = memory_budget
        # impl="auto"'s choice per input: planned once per shape, dtype, device and budget (plan_impl is pure)
        self._plans: dict[tuple, str] = {}
        self._checked: dict[tuple, tuple[Folding, tuple[int, ...], tuple[int, ...]]] = {}  # per input shape
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
            self.concat_project = nn.Sequential(nn.Conv2d(2 * inter_channels, 1, kernel_size=1, bias=False), nn.ReLU())
        self.out = conv(inter_channels, in_channels, kernel_size=1)
        if norm == "batch":
            self.norm = _BATCHNORM[dim](in_channels, eps=1e-5, momentum=0.1)
        elif norm == "layer":
            self.norm = ChannelLayerNorm(in_channels)
        else:
            self.norm = nn.Identity()
        self.pool = WindowMaxPool(self.subsample) if self.subsample is not None else None
        self.reset_parameters()

    def reset_parameters(self, init: str | None = None) -> None:
        """Initialises the block so that it starts as the identity.

        ``"official"``: θ, φ, g, W_z (and w_f) ~ N(0, 0.01²), biases 0, as the official code, made for inserting
        blocks into a pretrained network, whose features already carry the signal the block learns to combine.
        ``"pytorch"``: PyTorch's default conv init (as AlexHex7's port). A block trained from scratch needs it:
        the pairwise term θᵀφ is bilinear, and with both factors ~0.01 it starts at a saddle whose gradients are
        as tiny as the factors, so the block stays the identity (the long-range task of the demo stays at chance
        with the official init; ``tests/test_init_choice.py``). Either way the output starts at zero (γ = 0, or
        W_z = 0 without a norm).

        Args:
            init: the init to use now; default the block's ``init``, "auto" meaning "pytorch" (a block that has
                not been placed in a pretrained network, or a whole network re-initialised).
        """
        init = self.init if init is None else init
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(map(repr, INITS))}")
        init = "pytorch" if init == "auto" else init
        projections = [self.g, self.out] + ([] if self.mode == "gaussian" else [self.theta, self.phi])
        if self.mode == "concatenation":
            projections.append(self.concat_project[0])
        for conv in projections:
            if init == "official":
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

    def forward(
        self, x: Tensor, memory: Tensor | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
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
        source = x if memory is None else memory  # x̂: keys and values come from here
        # the checks and the folding depend on the shapes alone: done once per shape (the block's host time bounds
        # small blocks on a GPU)
        shapes = (x.shape, None if memory is None else memory.shape, return_attention and self.attention_budget_bytes)
        checked = self._checked.get(shapes)
        if checked is None:
            self._check_inputs(x, memory)
            checked = self._checked[shapes] = self._shapes(x, source, return_attention)
        folding, spatial, key_spatial = checked
        # y = 1/C(x) Σ_j f(θ(x_i), φ(x̂_j)) g(x̂_j); the projections go straight in, so that nothing here keeps them
        query, key, value = self._projections(x, source)
        if self.mode == "gaussian" and source is x and self.pool is None:
            key = query  # the same tensor: the pairwise step may use the symmetry of x xᵀ
        y, weights = self._attend(query, key, value, folding, spatial, key_spatial, return_attention)
        z = self._add_residual(self.norm(self._project_out(y, spatial, _memory_format(x))), x)  # Norm(W_z y) + x
        if return_attention:
            return z, scatter_attention(weights, folding, x.shape[0], spatial, key_spatial)
        return z

    # --- the steps of forward ----------------------------------------------------------------------------------

    def _shapes(
        self, x: Tensor, source: Tensor, return_attention: bool
    ) -> tuple[Folding, tuple[int, ...], tuple[int, ...]]:
        """The folding, the query positions' spatial size and the keys' (after subsampling), checked."""
        spatial = tuple(x.shape[2:])
        folding = self._folding(spatial)
        key_spatial = tuple(source.shape[2:])
        if self.pool is not None:
            key_spatial = tuple(s // k for s, k in zip(key_spatial, self.subsample))
        check_folding(folding, spatial, key_spatial)
        if return_attention:
            self._check_attention_size(x.shape[0], spatial, key_spatial)
        return folding, spatial, key_spatial

    def _projections(self, x: Tensor, source: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, N, Cq), keys (B, M, Cq) and values (B, M, C'): θ(x), φ(x̂), g(x̂), the raw features for the
        gaussian. Projections that read the same map run as one convolution with their weights stacked (θ, φ and
        g of x where x̂ is x, unpooled before the projections; φ and g of x̂ pooled before them): one large GEMM
        does the arithmetic of three small ones with a third of the calls, the same outputs up to rounding; φ(x) and
        g(x), side by side in that output, are then pooled by one call."""
        if self.mode == "gaussian" or self._hooked():
            return self._queries(x), *self._keys_values(source)
        pooled_first = self.pool is not None and self.subsample_position == "input"
        if source is x and not pooled_first:
            stacked = _conv_stacked((self.theta, self.phi, self.g), x)
            if stacked is not None:
                query, keys_values = stacked.split(
                    [self.theta.out_channels, self.phi.out_channels + self.g.out_channels], dim=1
                )
                if self.pool is not None:
                    keys_values = self.pool(keys_values)  # φ(x) and g(x) side by side: one pool for both
                key, value = keys_values.split([self.phi.out_channels, self.g.out_channels], dim=1)
                return to_positions(query), to_positions(key), to_positions(value)
        if pooled_first:
            key, value = (to_positions(t) for t in _project_stacked((self.phi, self.g), self.pool(source)))
            return self._queries(x), key, value
        return self._queries(x), *self._keys_values(source)

    def _hooked(self) -> bool:
        """Whether a forward hook watches a projection (which must then run as its own module)."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in (self.theta, self.phi, self.g))

    def _queries(self, x: Tensor) -> Tensor:
        """θ(x) as (B, N, C'); the raw features x (B, N, C) for the gaussian."""
        return to_positions(x) if self.mode == "gaussian" else _project(self.theta, x)

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        folding: Folding,
        spatial: tuple[int, ...],
        key_spatial: tuple[int, ...],
        return_attention: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """y = 1/C(x) Σ_j f(q_i, k_j) v_j (B, N, C'), on the path and in the precision of layers/pairwise.py's
        policy, each folded group of positions (extent, temporal groups) a problem of its own."""
        batch = query.shape[0]
        q = fold_positions(query, folding, spatial)  # (B', N', Cq)
        k = q if key is query else fold_positions(key, folding, key_spatial)  # (B', M', Cq)
        v = fold_positions(value, folding, key_spatial)  # (B', M', C')
        del query, key, value  # the pairwise step's inputs are q, k, v: nothing else keeps the projections
        impl = self.impl if return_attention or self.impl != "auto" else self._plan(q, k, v)
        y, weights = pairwise_step(q, k, v, self.mode, self.scale, impl, self._concat_project(), return_attention)
        return unfold_positions(y, folding, batch, spatial), weights

    def planning_budget(self, device: torch.device | str) -> int:
        """Bytes the dense path may take on ``device`` when this block plans its path (see ``memory_budget``)."""
        return memory_budget(device, self.memory_budget)

    def _plan(self, q: Tensor, k: Tensor, v: Tensor) -> str:
        """The path "auto" runs for these folded inputs, planned on the first call with their shapes."""
        budget = self.planning_budget(q.device)
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, budget)
        impl = self._plans.get(key)
        if impl is None:
            impl = self._plans[key] = plan_impl(self.mode, q, k, v, budget)
        return impl

    def _add_residual(self, z: Tensor, x: Tensor) -> Tensor:
        """z + x, in place where that is safe: only where z is the norm's own new tensor (not W_z's output itself,
        with ``norm=None``) that no forward hook (the norm's or a global one) has seen, in x's layout and dtype.
        No norm saves its output for the backward pass, so the add may overwrite it."""
        hooked = bool(self.norm._forward_hooks) or bool(nn.modules.module._global_forward_hooks)
        if (
            not isinstance(self.norm, nn.Identity)
            and not hooked
            and z.stride() == x.stride()
            and z.dtype == torch.promote_types(z.dtype, x.dtype)
        ):
            return z.add_(x)
        return x + z  # x first: z takes the input's memory layout (convs may return another)

    def _project_out(self, y: Tensor, spatial: tuple[int, ...], memory_format: torch.memory_format) -> Tensor:
        """W_z y: the (B, N, C') positions y as a (B, C, *S) map in ``memory_format``."""
        return self.out(to_map(y, spatial).contiguous(memory_format=memory_format))

    def _keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """x̂ (B, C, *S) -> keys (B, M, Cq) and values (B, M, C'): φ(x̂) (x̂ itself for the gaussian) and g(x̂),
        max-pooled before or after the projections where the block subsamples."""
        if self.pool is None or self.subsample_position == "input":
            if self.pool is not None:
                source = self.pool(source)  # (B, C, *S')
            key = to_positions(source) if self.mode == "gaussian" else _project(self.phi, source)
            return key, _project(self.g, source)
        spatial = tuple(source.shape[2:])
        if self.mode == "gaussian":
            key = to_positions(self.pool(source))
        else:
            key = to_positions(self.pool(to_map(_project(self.phi, source), spatial)))
        return key, to_positions(self.pool(to_map(_project(self.g, source), spatial)))

    def _folding(self, query_spatial: tuple[int, ...]) -> Folding:
        """The folding for this input: temporal groups of k frames become T/k independent problems."""
        k = self.temporal_groups
        if self.extent != "spacetime" or k == 1:
            return Folding(self.extent, 1)
        frames = query_spatial[0]
        if frames % k:
            raise ValueError(
                f"temporal_groups={k} frames per group must divide the clip's {frames} frames "
                f"(input spatial size {tuple(query_spatial)})"
            )
        return Folding("spacetime", frames // k)

    def _concat_project(self) -> nn.Sequential | None:
        return self.concat_project if self.mode == "concatenation" else None

    # the largest (B, N, M) float32 weight matrix ``return_attention=True`` builds; set per block to allow more
    attention_budget_bytes: int = 2**31

    def _check_attention_size(self, batch: int, spatial: tuple[int, ...], key_spatial: tuple[int, ...]) -> None:
        n, m = math.prod(spatial), math.prod(key_spatial)
        size = batch * n * m * 4
        if size > self.attention_budget_bytes:
            raise ValueError(
                f"return_attention=True would build a ({batch}, {n}, {m}) float32 weight matrix of "
                f"{size / 1e9:.1f} GB, above this block's attention_budget_bytes "
                f"({self.attention_budget_bytes / 1e9:.1f} GB); use a smaller input or batch, subsample the keys, "
                f"or raise block.attention_budget_bytes"
            )

    def _check_inputs(self, x: Tensor, memory: Tensor | None) -> None:
        expected = self.dim + 2
        names = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}[self.dim]
        if x.dim() != expected:
            raise ValueError(f"NonLocalBlock(dim={self.dim}) expects x of shape {names}; got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"NonLocalBlock was built for {self.in_channels} input channels; "
                f"x has {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if 0 in x.shape[2:]:
            raise ValueError(f"x has no positions to attend over (shape {tuple(x.shape)})")
        if memory is not None and memory.dim() == expected and 0 in memory.shape[2:]:
            raise ValueError(f"memory has no positions to attend to (shape {tuple(memory.shape)})")
        if memory is None:
            if self.memory_channels != self.in_channels:
                raise ValueError(
                    f"this block takes keys/values from a memory of {self.memory_channels} channels; pass memory="
                )
            source = x
        else:
            if memory.dim() != expected:
                raise ValueError(f"memory must have the same number of axes as x, {names}; got {tuple(memory.shape)}")
            if memory.shape[0] != x.shape[0]:
                raise ValueError(f"memory batch size {memory.shape[0]} differs from x's {x.shape[0]}")
            if memory.shape[1] != self.memory_channels:
                raise ValueError(
                    f"memory has {memory.shape[1]} channels; this block was built for "
                    f"memory_channels={self.memory_channels}"
                )
            if self.extent != "spacetime" or self.temporal_groups != 1:
                raise ValueError("memory= attends over another tensor: use extent='spacetime' and temporal_groups=1")
            source = memory
        if self.subsample is not None:
            spatial = tuple(source.shape[2:])
            if any(k > s for k, s in zip(self.subsample, spatial)):
                raise ValueError(
                    f"subsample {self.subsample} is larger than the key/value input's spatial size {spatial}"
                )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, dim={self.dim}, mode={self.mode!r}, inter_channels={self.inter_channels}, "
            f"subsample={self.subsample}, subsample_position={self.subsample_position!r}, scale={self.scale}, "
            f"norm={self.norm_type!r}, extent={self.extent!r}, "
            f"temporal_groups={self.temporal_groups}, impl={self.impl!r}, "
            + (f"memory_budget={self.memory_budget}, " if self.memory_budget is not None else "")
            + f"init={self.init!r}"
        )


def _project(conv: nn.Module, t: Tensor) -> Tensor:
    """A 1x1 conv of a (B, Cin, *S) map, as the (B, N, Cout) sequence of positions (a strided view)."""
    return to_positions(conv(t))


def _conv_stacked(convs: Sequence[nn.Module], t: Tensor) -> Tensor | None:
    """The 1x1 convs ``convs`` of one map ``t`` (B, Cin, *S) as one conv with their weights stacked: their outputs
    side by side along the channels, (B, Σ Cout_i, *S); None where some have a bias and some not."""
    if len({c.bias is None for c in convs}) > 1:
        return None
    weight = torch.cat([c.weight for c in convs])
    bias = None if convs[0].bias is None else torch.cat([c.bias for c in convs])
    return convs[0]._conv_forward(t, weight, bias)


def _project_stacked(convs: Sequence[nn.Module], t: Tensor) -> tuple[Tensor, ...]:
    """The 1x1 convs ``convs`` of one map ``t`` (B, Cin, *S) as one conv with their weights stacked; each output
    (B, Cout_i, *S) a channel slice of the stacked output (each conv on its own where biases differ)."""
    stacked = _conv_stacked(convs, t)
    if stacked is None:
        return tuple(c(t) for c in convs)
    return stacked.split([c.out_channels for c in convs], dim=1)


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout of a (B, C, *S) map: channels-last (position-major) or the default channel-major."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


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


def find_nonlocal_blocks(model: nn.Module) -> dict[str, NonLocalBlock]:
    """Every :class:`NonLocalBlock` in ``model``, by module name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NonLocalBlock)}


def init_inserted_blocks(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Gives the official init to the blocks of ``model`` that sit in a pretrained network and chose ``init="auto"``.

    Loaders that fill a network's other weights from a file and leave its blocks fresh (``load_pretrained``, the
    detection backbone's loader) call this: a block inserted into a pretrained network starts as the official code
    starts it. Blocks with an explicit ``init`` keep theirs.

    Args:
        model: the network.
        names: the module names of the fresh blocks; default every block of ``model``.

    Returns:
        The names of the blocks re-initialised.
    """
    blocks = find_nonlocal_blocks(model)
    chosen = list(blocks) if names is None else list(names)
    done = [name for name in chosen if blocks[name].init == "auto"]
    for name in done:
        blocks[name].reset_parameters("official")
    return done


def _keyword_defaults() -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(NonLocalBlock.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


# The block's options and their defaults, read from its signature: the one definition every builder reads.
BLOCK_DEFAULTS: Mapping[str, Any] = MappingProxyType(_keyword_defaults())
# The official code's block in the paper's video networks (the paper's facts, stated here even where they equal a
# block default): embedded gaussian, keys/values max-pooled 1x2x2 before φ and g, θᵀφ scaled by C'^-0.5 (the
# paper has no scale; the official code scales only the softmax modes, SCALED_MODES). ResNet3d builds its blocks
# with these under a network's own options
# (``resnet3d.NONLOCAL_DEFAULTS`` is this mapping) and the zoo registers them (``zoo.NL``).
PAPER_VIDEO_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"mode": "embedded_gaussian", "subsample": (1, 2, 2), "subsample_position": "input", "scale": "auto"}
)
# the modes whose θᵀφ the official code scales (the logits of a softmax); the others keep scale None
SCALED_MODES = ("gaussian", "embedded_gaussian")


def _parse_subsample(subsample: int | Sequence[int] | None, dim: int) -> tuple[int, ...] | None:
    if subsample is None:
        return None
    if isinstance(subsample, int):
        kernel = (subsample,) * dim
    elif isinstance(subsample, (tuple, list)):
        kernel = tuple(subsample)
    else:
        kernel = ()
    if len(kernel) != dim or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernel):
        raise ValueError(
            f"subsample must be a positive int or {dim} positive ints (one per spatial axis); got {subsample!r}"
        )
    return None if all(k == 1 for k in kernel) else kernel


def _parse_scale(scale: None | float | str, inter_channels: int) -> float:
    if scale is None:
        return 1.0
    if scale == "auto":
        return inter_channels**-0.5
    if isinstance(scale, (str, bool)) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be None, 'auto' or a positive finite number; got {scale!r}")
    return float(scale)
