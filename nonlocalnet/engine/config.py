"""Run configurations: YAML files (a path, or a config shipped in the package, :func:`~nonlocalnet.io.find_config`)
on top of a schema's defaults, overridable with ``key=value``.

One file because it is one loader: the schema, the YAML chain, the overrides and the checks (the memory check included)
all serve :func:`load_config` and read the same schema.

One loader serves every kind of run; a :class:`ConfigSchema` says what a kind's config holds. :data:`VIDEO` (the
default) has the sections ``model``, ``data``, ``train``, ``test`` and the top-level ``output_dir`` and ``seed``;
the detection schema is :data:`nonlocalnet.detection.config.SCHEMA`. A YAML file may name a ``base`` file that it
extends: a path relative to itself, else a shipped config named as ``--config`` names one. Overrides use dotted
keys and YAML values, read by :func:`parse_override` for every command of the CLI: ``train.lr=0.02
train.lr_steps=[100,200] model.name=nl_i3d_r50``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..data.decoders import DECODERS
from ..io import find_config, packaged_configs, write_text_atomic
from .precision import MEMORY_FORMATS

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/default",
    "model": {
        "name": "nl_c2d_r50",
        "options": {},  # keyword overrides of the registered model (num_classes is set from data)
        "pretrained": None,  # a .safetensors / .pt / .pth state dict (2D ImageNet weights are inflated)
    },
    "data": {
        "type": "synthetic",  # "synthetic" (built in), "kinetics" (path label lists), "charades" (multi-label)
        "num_classes": 2,  # null: from the training list (its largest label + 1); a number must match it
        "root": None,
        "train_list": None,
        "test_list": None,
        "frames": 8,
        "sampling_rate": 8,
        "train_scale": [256, 320],
        "crop_size": 224,  # null: full frames at test time (the paper's fully-convolutional test; test_crops 1)
        "test_scale": 256,
        "test_clips": 10,
        "test_crops": 3,
        "skip_missing": False,
        "decoder": "pyav",  # or "torchcodec" (an extra: torchcodec and FFmpeg's shared libraries)
        "workers": 0,
        # built-in data only
        "train_size": 4096,
        "test_size": 1024,
        "image_size": 32,
    },
    "train": {
        "batch_size": 8,  # clips per process
        "iterations": 400000,
        "lr": 0.01,
        "lr_steps": [150000, 300000],
        "lr_gamma": 0.1,
        "warmup_iterations": 0,
        "warmup_factor": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1.0e-4,
        "bn_weight_decay": 0.0,
        "clip_grad_norm": None,
        # mixed precision: auto = bf16 on CUDA GPUs with bf16 tensor cores, none elsewhere (measured faster there,
        # slower on CPUs); false; bf16; fp16 (with a GradScaler); true = bf16 where the device computes it, else
        # fp16 (nonlocalnet.engine.precision.amp_dtype). Also what test, predict and extract run in.
        "amp": "auto",
        # the network's layout: auto = channels-last on CUDA, contiguous on CPUs (each the faster there), or
        # channels_last / contiguous (nonlocalnet.engine.precision.memory_format)
        "memory_format": "auto",
        # torch.compile the network (model.compile()): off by default, as its first steps take minutes
        "compile": False,
        "freeze_bn": False,
        "sync_bn": False,
        "precise_bn_batches": 200,
        "log_every": 20,
        "checkpoint_every": 5000,
        "keep_checkpoints": 3,
        "eval_every": 0,  # iterations between evaluations during training; 0 = only at the end
        # at this iteration, warn about each non-local block still at the identity or at uniform attention on
        # the step's first clip (nonlocalnet.viz.diagnostics); 0 = never
        "check_blocks_after": 1000,
    },
    "test": {
        "batch_size": 8,
        "fully_convolutional": False,
        "checkpoint": None,
        "at_end": True,  # test the final model when training ends (false: stop after model_final)
    },
    "device": "auto",
    "progress": True,
}


class ConfigError(ValueError):
    """A config file or override that cannot be used."""

    all_processes = True  # raised alike by every process of a torchrun job: the CLI says it once


@dataclass(frozen=True)
class Range:
    """The values a numeric key takes: ``low`` <= value <= ``high`` (None: unbounded on that side; with
    ``low_open`` the low end itself excluded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def check(self, name: str, value: Any) -> None:
        """Raises ConfigError naming ``name`` and ``value`` when the value lies outside the range."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return  # the type check has spoken (or the key is optional and unset)
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if too_low or (self.high is not None and value > self.high):
            raise ConfigError(f"{name} must be {self.describe()}; got {value!r}")

    def describe(self) -> str:
        low = None if self.low is None else f"{'greater than' if self.low_open else 'at least'} {self.low:,}"
        high = None if self.high is None else f"at most {self.high:,}"
        return " and ".join(part for part in (low, high) if part) or "a number"


@dataclass(frozen=True)
class Items:
    """What a list-valued key holds: ``kind`` ("int", "number" or "str") elements in ``range``, between
    ``min_length`` and ``max_length`` of them (None: any number)."""

    kind: str
    range: Range = Range()
    min_length: int = 0
    max_length: int | None = None

    def check(self, name: str, value: Any) -> None:
        """Raises ConfigError naming ``name``, the element's position and its value."""
        if value is None:
            return
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list; got {value!r}")
        if len(value) < self.min_length or (self.max_length is not None and len(value) > self.max_length):
            count = (
                f"{self.min_length}"
                if self.min_length == self.max_length
                else f"{self.min_length} to {self.max_length}"
                if self.max_length is not None
                else f"at least {self.min_length}"
            )
            raise ConfigError(f"{name} must hold {count} element(s); got {len(value)}: {value!r}")
        for i, item in enumerate(value):
            if self.kind == "int":
                ok, kind = isinstance(item, int) and not isinstance(item, bool), "an integer"
            elif self.kind == "number":
                ok = isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)
                kind = "a finite number"
            else:
                ok, kind = isinstance(item, str), "a string"
            if not ok:
                raise ConfigError(f"{name}[{i}] must be {kind}; got {item!r} (in {value!r})")
            self.range.check(f"{name}[{i}]", item)


@dataclass(frozen=True)
class ConfigSchema:
    """What one kind of run config holds, and how its values are checked.

    Attributes:
        defaults: every known key with its default; a key whose default is not None takes values of its type.
        free: sections whose own keys are not checked here (a model's keyword arguments, checked where the model
            is built). A mapping inside one is a value (a placement, say): a file that sets it replaces its base
            file's whole, while a dotted override sets one key of it.
        untyped: keys that take values of more than one type (``check`` checks them).
        positive: keys that must be at least 1.
        non_negative: keys that must not be negative.
        check: further checks of a complete config, raising :class:`ConfigError` naming the key.
        folder: the folder of shipped configs in which a bare name ("tiny_shapes") is looked up.
        ranges: numeric keys' ranges beyond ``positive`` / ``non_negative`` (:class:`Range`).
        items: list-valued keys, each element checked (:class:`Items`).
        optional: keys whose default is None and which take null or a value of one of these types.
    """

    defaults: Mapping[str, Any]
    free: tuple[str, ...] = ()
    untyped: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()
    non_negative: tuple[str, ...] = ()
    check: Callable[[Mapping[str, Any]], None] | None = None
    folder: str | None = None
    ranges: Mapping[str, Range] = dataclasses.field(default_factory=dict)
    items: Mapping[str, Items] = dataclasses.field(default_factory=dict)
    optional: Mapping[str, tuple[type, ...]] = dataclasses.field(default_factory=dict)

    def is_free(self, name: str) -> bool:
        """Whether the dotted key ``name`` lies inside a free section."""
        return any(name.startswith(section + ".") for section in self.free)


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), schema: ConfigSchema | None = None
) -> dict[str, Any]:
    """The schema's defaults (video's by default), updated by a YAML file (and the files it extends), then by
    ``key=value`` overrides; checked."""
    schema = schema or VIDEO
    data: dict[str, Any] = {}
    if path is not None:
        try:
            path = find_config(path, folder=schema.folder)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        data = _read_yaml_chain(path, schema)
    return build_config(data, overrides, schema)


def build_config(
    data: Mapping[str, Any], overrides: Iterable[str] = (), schema: ConfigSchema | None = None
) -> dict[str, Any]:
    """The schema's defaults updated by ``data`` (a config as a mapping, e.g. the one a checkpoint recorded), then
    by ``key=value`` overrides; checked. A complete config gives itself back."""
    schema = schema or VIDEO
    cfg = copy.deepcopy(dict(schema.defaults))
    merge(cfg, data, schema=schema)
    for item in overrides:
        apply_override(cfg, item, schema)
    check_config(cfg, schema)
    return cfg


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``): an alias is expanded into a copy wherever the value is
    used, so a file of a kilobyte can stand for gigabytes (a "billion laughs" file); configs have no need of them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"an alias (*{event.anchor}) is not accepted in a config: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def read_yaml(text: str, what: str) -> Any:
    """The value of a YAML text (a config file, an override's value) read safely: no tags that build Python
    objects, no aliases (:class:`_NoAliasLoader`). Raises ConfigError naming ``what`` and the line."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = " ".join(part for part in (e.context, e.problem) if part)
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests too deeply to be a config") from None


def _read_yaml_chain(path: Path, schema: ConfigSchema, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} extends itself through its 'base' chain")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"config {path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    data = read_yaml(text, f"config {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections; got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    out = _read_yaml_chain(_find_base(base, path, schema), schema, seen + (path.resolve(),))
    merge(out, data, strict=False, schema=schema)  # keys are checked against the defaults once the chain is resolved
    return out


def _find_base(base: Any, path: Path, schema: ConfigSchema) -> Path:
    """The file a config's ``base:`` names: relative to the including file first (as written, then with
    ``.yaml``), then a shipped config as ``--config`` finds one (``kinetics/nl_c2d_r50_8x8``,
    ``configs/kinetics/nl_c2d_r50_8x8.yaml``, a stem).

    Raises:
        ConfigError: no such file; the message names every place looked.
    """
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config {path}: base must name one config file (a path relative to it); got {base!r}")
    near = [path.parent / base, (path.parent / base).with_suffix(".yaml")]
    for candidate in near:
        if candidate.is_file():
            return candidate
    try:
        return find_config(base, folder=schema.folder)
    except FileNotFoundError as e:
        looked = ", ".join(dict.fromkeys(os.fspath(p) for p in near))
        raise ConfigError(
            f"config {path}: base {os.fspath(base)!r} not found; looked at {looked}, then in the "
            f"shipped configs under {packaged_configs()} ({e})"
        ) from None


def merge(
    into: dict[str, Any],
    update: Mapping[str, Any],
    where: str = "",
    strict: bool = True,
    schema: ConfigSchema | None = None,
) -> dict[str, Any]:
    """Recursively updates ``into`` with ``update``.

    With ``strict``, unknown keys are an error, except inside the schema's free sections (``model.options`` of a
    video config: the model's own keyword arguments).
    """
    schema = schema or VIDEO
    for key, value in update.items():
        name = f"{where}{key}"
        free = schema.is_free(name)
        if strict and key not in into and not free and (where or key not in schema.defaults):
            known = ", ".join(sorted(into))
            raise ConfigError(
                f"unknown config key {name!r}; known keys{f' of {where[:-1]!r}' if where else ''}: {known}"
            )
        if (
            isinstance(into.get(key), dict)
            and not free
            and not isinstance(value, Mapping)
            and (key in schema.defaults or where)
        ):
            raise ConfigError(
                f"config section {name!r} must be a mapping of keys ({', '.join(sorted(into[key]))}); got {value!r}"
            )
        if isinstance(into.get(key), dict) and isinstance(value, Mapping) and not free:
            merge(into[key], value, name + ".", strict, schema)
        else:
            into[key] = copy.deepcopy(value)
    return into


def parse_override(item: str, example: str = "train.lr=0.02") -> tuple[str, Any]:
    """``"train.lr_steps=[100,200]"`` -> ``("train.lr_steps", [100, 200])``: the dotted key, and the value read as
    YAML (numbers, lists, mappings, true / false, null; anything else is a string).

    This is the override syntax of every command: config keys for ``train`` / ``test`` / ``detect-*``, model
    options for ``convert`` / ``flops`` / ``visualize``.

    Raises:
        ConfigError: no ``=``, or a value that is not valid YAML; the message names the item.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. {example})")
    key, text = item.split("=", 1)
    value = read_yaml(text, f"override {item!r}: value") if text else ""
    return key.strip(), value


def apply_override(cfg: dict[str, Any], item: str, schema: ConfigSchema | None = None) -> None:
    """Applies one ``dotted.key=value`` override (:func:`parse_override`) to a config of ``schema``."""
    schema = schema or VIDEO
    key, value = parse_override(item)
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if part not in node and schema.is_free(here):
            node[part] = {}
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override {item!r}: {here!r} is not a config section")
        node = node[part]
    where = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    merge(node, {parts[-1]: value}, where, schema=schema)


def options_from_overrides(items: Iterable[str], example: str = "width=32") -> dict[str, Any]:
    """A model's keyword arguments from ``key=value`` overrides (:func:`parse_override`), as a config's
    ``model.options`` holds them: ``["width=8", "layers=[1,1,1,1]"]`` -> ``{"width": 8, "layers": [1, 1, 1, 1]}``.
    A dotted key sets a key of a mapping option (``nonlocal_options.mode=gaussian``).

    Raises:
        ConfigError: an item that is no ``key=value``, a key that is no option name, or a Python tuple (a YAML
            string, where a list is meant); the message names it.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item, example)
        parts = key.split(".")
        if not all(part.isidentifier() for part in parts):
            raise ConfigError(f"override {item!r}: {key!r} is not an option name (e.g. {example})")
        if isinstance(value, str) and value.startswith("(") and value.endswith(")"):  # a Python tuple is no YAML
            raise ConfigError(f"override {item!r}: write a sequence as a YAML list, [{value[1:-1]}]")
        node = options
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: option {'.'.join(parts[: i + 1])!r} is not a mapping")
        node[parts[-1]] = value
    return options


AMP_CHOICES = ("auto", False, True, "bf16", "fp16")


def _check_types(cfg: Mapping[str, Any], defaults: Mapping[str, Any], schema: ConfigSchema, where: str = "") -> None:
    """Every key whose default has a type takes a value of that type (a number for a float, a list for a list)."""
    for key, default in defaults.items():
        name, value = f"{where}{key}", cfg.get(key)
        if default is None or name in schema.untyped or schema.is_free(name + "."):
            continue
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config section {name!r} must be a mapping; got {value!r}")
            _check_types(value, default, schema, name + ".")
            continue
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            kind = "a finite number"
        elif isinstance(default, list):
            ok, kind = isinstance(value, list), "a list"
        else:
            ok, kind = isinstance(value, type(default)), f"a {type(default).__name__}"
        if not ok:
            raise ConfigError(f"{name} must be {kind}; got {value!r}")


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_config(cfg: Mapping[str, Any], schema: ConfigSchema | None = None) -> None:
    """Raises ConfigError for values that cannot work, naming the key: types, ranges, then the schema's checks."""
    schema = schema or VIDEO
    _check_types(cfg, schema.defaults, schema)
    for key in schema.positive:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1; got {_get(cfg, key)!r}")
    for key in schema.non_negative:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must not be negative; got {_get(cfg, key)!r}")
    for key, types in schema.optional.items():
        value = _get(cfg, key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            names = " or ".join(
                {"str": "a string (a path)", "int": "an integer", "float": "a number"}.get(t.__name__, t.__name__)
                for t in types
            )
            raise ConfigError(f"{key} must be {names} or null; got {value!r}")
    for key, value_range in schema.ranges.items():
        value_range.check(key, _get(cfg, key))
    for key, items in schema.items.items():
        items.check(key, _get(cfg, key))
    if schema.check is not None:
        schema.check(cfg)


def check_steps(cfg: Mapping[str, Any], key: str, unit: str) -> None:
    """Raises ConfigError unless the list at ``key`` holds increasing integers (``unit``: what they count)."""
    steps = _get(cfg, key)
    if not isinstance(steps, list):
        raise ConfigError(f"{key} must be a list of {unit} (integers); got {steps!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise ConfigError(f"{key} must be a list of {unit} (integers); got {steps}")
    if steps != sorted(steps):
        raise ConfigError(f"{key} must be increasing; got {steps}")


def _check_video(cfg: Mapping[str, Any]) -> None:
    if (
        cfg["train"]["amp"] not in AMP_CHOICES
        or isinstance(cfg["train"]["amp"], (int, float))
        and not isinstance(cfg["train"]["amp"], bool)
    ):
        raise ConfigError(
            f"train.amp must be auto, false, bf16, fp16 or true (bf16 where the device supports it, else "
            f"fp16); got {cfg['train']['amp']!r}"
        )
    if cfg["train"]["memory_format"] not in MEMORY_FORMATS:
        raise ConfigError(
            f"train.memory_format must be one of {', '.join(MEMORY_FORMATS)}; got {cfg['train']['memory_format']!r}"
        )
    clip = cfg["train"]["clip_grad_norm"]
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0 or not math.isfinite(clip)
    ):
        raise ConfigError(f"train.clip_grad_norm must be a positive number or null; got {clip!r}")
    data = cfg["data"]
    classes = data["num_classes"]
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise ConfigError(
            f"data.num_classes must be a positive integer, or null to take it from the training list; got {classes!r}"
        )
    if classes is None and data["type"] == "synthetic":
        raise ConfigError(
            "data.num_classes=null takes the number from a video list; the built-in synthetic data has none: set 2 to 6"
        )
    crop = data["crop_size"]
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 1):
        raise ConfigError(
            f"data.crop_size must be a positive integer, or null for full frames at test time; got {crop!r}"
        )
    if crop is None and data["test_crops"] != 1:
        raise ConfigError(
            f"data.crop_size=null (full frames at test time) takes data.test_crops=1; got {data['test_crops']}"
        )
    if data["type"] not in ("synthetic", "kinetics", "charades"):
        raise ConfigError(f"data.type must be 'synthetic', 'kinetics' or 'charades'; got {data['type']!r}")
    if data["decoder"] not in DECODERS:
        raise ConfigError(f"data.decoder must be one of {', '.join(DECODERS)}; got {data['decoder']!r}")
    if data["type"] != "synthetic":
        for key in ("root", "train_list", "test_list"):
            if not data[key]:
                raise ConfigError(f"data.type={data['type']!r} needs data.{key}")
    check_steps(cfg, "train.lr_steps", "iterations")
    low, high = data["train_scale"]
    if low > high:
        raise ConfigError(
            f"data.train_scale must be [shortest, longest] with shortest <= longest; got {data['train_scale']!r}"
        )
    check_memory(cfg)


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: Mapping[str, Any], memory: int | None = None) -> None:
    """Raises ConfigError naming the keys and the size when one batch of clips, or the classifier, cannot fit in
    this machine's memory (``memory`` bytes; default its physical memory): refused up front, rather than failing
    in an allocation after the run directory was written.

    The sizes are lower bounds of what the run holds (float32 clips of one batch; the classifier's weights, their
    gradient and the optimiser's momentum at the widest ResNet-50 feature, 2048), so nothing that fits is refused.
    """
    memory = memory if memory is not None else machine_memory()
    if memory is None:
        return
    data, train, test = cfg["data"], cfg["train"], cfg["test"]
    # data.crop_size=null (full frames, testing only): a frame's shorter side is data.test_scale
    crop = data["crop_size"] if data["crop_size"] is not None else data["test_scale"]
    side = data["image_size"] if data["type"] == "synthetic" else crop
    test_side = data["image_size"] if data["type"] == "synthetic" else max(crop, data["test_scale"])
    sizes = {
        f"one training batch (train.batch_size={train['batch_size']} x 3 x data.frames={data['frames']} x "
        f"{side} x {side})": 4 * train["batch_size"] * 3 * data["frames"] * side * side,
        f"one test batch (test.batch_size={test['batch_size']} x 3 x data.frames={data['frames']} x {test_side} x "
        f"{test_side})": 4 * test["batch_size"] * 3 * data["frames"] * test_side * test_side,
    }
    if data["num_classes"] is not None:  # null: taken from the training list when the run starts
        sizes[
            f"the classifier (data.num_classes={data['num_classes']} x 2048 features, with its gradient and momentum)"
        ] = 3 * 4 * data["num_classes"] * 2048
    for what, size in sizes.items():
        if size > memory:
            raise ConfigError(
                f"{what} needs {size / 2**30:,.1f} GiB, more than this machine's memory "
                f"({memory / 2**30:,.1f} GiB); lower them"
            )


VIDEO = ConfigSchema(
    DEFAULTS,
    free=("model.options",),
    untyped=("train.amp", "data.num_classes", "data.crop_size"),  # checked by _check_video
    positive=(
        "train.batch_size",
        "train.iterations",
        "train.log_every",
        "train.checkpoint_every",
        "test.batch_size",
        "data.frames",
        "data.sampling_rate",
        "data.test_clips",
        "data.test_crops",
        "data.image_size",
        "data.train_size",
        "data.test_size",
    ),
    non_negative=(
        "train.keep_checkpoints",
        "train.precise_bn_batches",
        "train.eval_every",
        "train.check_blocks_after",
        "train.warmup_iterations",
        "data.workers",
        "train.lr",
        "train.weight_decay",
        "train.momentum",
        "train.bn_weight_decay",
    ),
    check=_check_video,
    # every other numeric key's range (the sizes' upper bound is the machine's memory: check_memory)
    ranges={
        "seed": Range(0, 2**63 - 1),
        "train.lr_gamma": Range(0, 1, low_open=True),
        "train.warmup_factor": Range(0, 1),
        "train.momentum": Range(0, 1),
        "data.test_scale": Range(1),
        "data.workers": Range(0, 1024),
    },
    items={"train.lr_steps": Items("int", Range(0)), "data.train_scale": Items("int", Range(1), 2, 2)},
    optional={
        "model.pretrained": (str,),
        "test.checkpoint": (str,),
        "data.root": (str,),
        "data.train_list": (str,),
        "data.test_list": (str,),
    },
)


def save_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(to_plain(cfg), sort_keys=False))


def to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
