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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

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
_ALIASES: dict[str, str] = {}  # another name -> the registered name it builds


def register_model(
    fn: Builder | None = None, *, name: str | None = None, defaults: Mapping[str, Any] | None = None
) -> Any:
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
        if key in _ALIASES:
            raise ValueError(f"{key!r} is already an alias of {_ALIASES[key]!r}")
        if key in _REGISTRY:
            raise ValueError(f"a model named {key!r} is already registered ({_REGISTRY[key].builder!r})")
        summary = (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else ""
        _REGISTRY[key] = ModelEntry(key, builder, summary, MappingProxyType(dict(defaults or {})))
        return builder

    return register if fn is None else register(fn)


def register_alias(alias: str, name: str) -> None:
    """Makes ``alias`` build the registered ``name`` (e.g. a config's name, ``nl_i3d_r50_32x2`` for ``nl_i3d_r50``).

    :func:`list_models` lists registered names only; :func:`list_aliases` the aliases.

    Raises:
        ValueError: ``alias`` is taken (a name or an alias) or ``name`` is not registered.
    """
    if alias in _REGISTRY or alias in _ALIASES:
        raise ValueError(f"{alias!r} is already a model name or an alias")
    if name not in _REGISTRY:
        raise ValueError(f"cannot alias {alias!r} to {name!r}: no model of that name")
    _ALIASES[alias] = name


def list_aliases(pattern: str | None = None) -> dict[str, str]:
    """Aliases (optionally those matching a glob) -> the registered names they build, sorted by alias."""
    return {a: n for a, n in sorted(_ALIASES.items()) if pattern is None or fnmatch.fnmatchcase(a, pattern)}


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted, optionally filtered by a glob such as ``"nl*_c2d_r50*"``."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_model_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of a registered name.

    Raises:
        UnknownModel: unknown name (a KeyError and a ValueError; the message lists the closest names).
    """
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        close = closest_names(str(name), sorted(_REGISTRY))
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModel(
            f"unknown model {name!r} ({len(_REGISTRY)} registered, see nonlocalnet.models.list_models()){hint}"
        )
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


def create_model(
    name: str, pretrained: str | os.PathLike | None = None, num_classes: int | None = None, **overrides: Any
) -> nn.Module:
    """Builds a registered model, e.g. ``create_model("nl_i3d_r50", num_classes=157)``.

    Args:
        name: a name from :func:`list_models` or an alias (:func:`list_aliases`).
        pretrained: a weights file to start from, loaded by :func:`~nonlocalnet.models.load_pretrained` (a
            checkpoint of this or of its baseline network, a converted zoo file, a torchvision ImageNet ResNet,
            inflated); None for the initialisation. Nothing is downloaded: a name that is no file is refused
            with how to make one.
        num_classes: classifier outputs; default the registered one (400, the tiny networks' 2).
        **overrides: keyword arguments replacing the registered defaults (e.g. ``layers=(1, 1, 1, 1), width=8``
            for a tiny copy); an unknown one is an error that names it.

    Raises:
        UnknownModel: no such name.
        FileNotFoundError: ``pretrained`` is no file (the message says how to make one).
        ValueError: the file does not fit the model (``PretrainedMismatch``).
    """
    entry = get_model_entry(name)
    if pretrained is not None:
        _check_pretrained(pretrained)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = entry.builder(**overrides)
    if pretrained is not None:
        from .checkpoints.pretrained import load_pretrained

        load_pretrained(model, pretrained)
    return model


def _check_pretrained(pretrained: Any) -> None:
    """Refuses a ``pretrained`` that is no file before a model is built: nonlocalnet downloads no weights."""
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(
            f"pretrained must be the path of a weights file; got {pretrained!r} (nonlocalnet "
            f"downloads nothing: see docs/models.md, 'Starting weights')"
        )
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(
            2,
            f"pretrained={os.fspath(pretrained)!r} is no file; nonlocalnet downloads no weights. Convert a "
            f"checkpoint with `nonlocalnet convert IN OUT.safetensors` (the official Caffe2 code's, "
            f"PyTorchVideo's, mmaction2's) or save torchvision's ImageNet ResNet "
            f'(torch.save(torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict(), PATH)), then '
            f"pass its path",
            os.fspath(pretrained),
        )
