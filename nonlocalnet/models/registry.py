"""Models by name: ``register_model`` / ``list_models`` / ``create_model``, as in torchvision and timm.

A registered model is a builder function taking keyword overrides. Builders made from a table of defaults (as
the paper's networks in :mod:`nonlocalnet.models.zoo` are) also record those defaults, so
``model_defaults("nl_i3d_r50")`` shows exactly what the name means.

This module holds the table and knows no model: :mod:`~nonlocalnet.models.zoo` imports it to register the paper's
networks, and importing :mod:`nonlocalnet.models` imports the zoo.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, TypeVar

from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    """One registered name.

    Attributes:
        name: the registered name.
        builder: called with keyword overrides, returns the model.
        summary: one line on what the model is (the builder's docstring's first line).
        defaults: the keyword arguments the builder passes to the model class, where known (else empty).
    """

    name: str
    builder: Callable[..., nn.Module]
    summary: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(fn: Builder | None = None, *, name: str | None = None,
                   defaults: Mapping[str, Any] | None = None) -> Any:
    """Registers a model builder under its function name (or ``name``); a name can be registered once.

    Use as ``@register_model`` or ``@register_model(name="x", defaults={...})``.

    Args:
        fn: the builder, called as ``fn(**overrides)``.
        name: the registered name; default ``fn.__name__``.
        defaults: the builder's defaults, for :func:`model_defaults` (informational).

    Returns:
        The builder itself (or a decorator when ``fn`` is None).

    Raises:
        ValueError: the name is already registered.
    """

    def register(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"a model named {key!r} is already registered ({_REGISTRY[key].builder!r})")
        summary = (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else ""
        _REGISTRY[key] = ModelEntry(key, builder, summary, MappingProxyType(dict(defaults or {})))
        return builder

    return register if fn is None else register(fn)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted, optionally filtered by a glob such as ``"nl*_c2d_r50*"``."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_model_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of a registered name.

    Raises:
        UnknownModel: unknown name (a KeyError and a ValueError; the message lists the closest names).
    """
    if name not in _REGISTRY:
        close = closest_names(str(name), sorted(_REGISTRY))
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModel(f"unknown model {name!r} ({len(_REGISTRY)} registered, see "
                           f"nonlocalnet.models.list_models()){hint}")
    return _REGISTRY[name]


def closest_names(name: str, names: list[str], n: int = 5) -> list[str]:
    """The registered names most like ``name``: similar ones (difflib), those sharing the longest start first
    (``nl_i3d_r50_8x16`` -> ``nl_i3d_r50_8x8`` before ``nl_i3d_r50_128x1``)."""
    similar = difflib.get_close_matches(name, names, n=3 * n, cutoff=0.6)

    def shared_start(other: str) -> int:
        return len(os.path.commonprefix([name, other]))

    ratio = {o: difflib.SequenceMatcher(None, name, o).ratio() for o in similar}
    return sorted(similar, key=lambda o: (-shared_start(o), -ratio[o]))[:n]


class UnknownModel(KeyError, ValueError):
    """A model name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def model_defaults(name: str) -> dict[str, Any]:
    """The keyword arguments a registered name passes to its model class (empty if not recorded)."""
    return copy.deepcopy(dict(get_model_entry(name).defaults))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered model, e.g. ``create_model("nl_i3d_r50", num_classes=157)``.

    Args:
        name: a name from :func:`list_models`.
        **overrides: keyword arguments replacing the registered defaults (e.g. ``layers=(1, 1, 1, 1), width=8``
            for a tiny copy); an unknown one is an error that names it.
    """
    return get_model_entry(name).builder(**overrides)
