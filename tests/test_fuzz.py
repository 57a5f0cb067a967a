"""Property-based fuzzing (Hypothesis) of what reads user input: the config loader, the override parser, the
video-list reader and the COCO reader. Random and mutated inputs give a valid result or one user error (a
ValueError, or an OSError naming its file) that the CLI turns into one `error:` line; never another exception,
never a hang (each example has a deadline).

Examples per test are bounded (``max_examples``) so the quick suite stays quick: 150 + 150 + 200 + 200 + 150 + 100
= 950 cases in all, the same ones on every run unless ``NONLOCALNET_FUZZ_EXPLORE=1``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nonlocalnet.cli import user_error
from nonlocalnet.data.prepare import read_list_lines
from nonlocalnet.data.video_list import read_video_list
from nonlocalnet.engine.config import DEFAULTS, apply_override, build_config, load_config, to_plain


def fuzz(examples: int) -> settings:
    """Hypothesis' settings of one fuzz test: ``examples`` cases, none of which may take 5 s (a hang). The cases
    are the same on every run (a failure in CI reproduces); ``NONLOCALNET_FUZZ_EXPLORE=1`` draws new ones."""
    return settings(
        max_examples=examples,
        deadline=5000,
        database=None,
        derandomize=not os.environ.get("NONLOCALNET_FUZZ_EXPLORE"),
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def _user_error_or_valid(call) -> object:
    """Runs ``call``; a ValueError / OSError must make one line for the CLI, anything else fails the test."""
    try:
        return call()
    except (ValueError, OSError) as e:
        message = user_error(e)
        assert message is not None and "\n" not in message, repr(e)
        return e


# --- the config loader -----------------------------------------------------------------------------------------

FULL_CONFIG = yaml.safe_dump(to_plain(DEFAULTS), sort_keys=False)
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _mutate(text: str, data: st.DataObject) -> str:
    """A few random character edits (insert, delete, replace) of ``text``."""
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(chars)))
        kind = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = data.draw(
            st.sampled_from(
                [
                    ":",
                    "-",
                    "[",
                    "]",
                    "{",
                    "}",
                    "&a",
                    "*a",
                    "!!",
                    "'",
                    '"',
                    "\n",
                    "  ",
                    "#",
                    "1e9",
                    "-1",
                    "null",
                    "\t",
                    "\x00",
                    "é",
                ]
            )
        )
        if kind == "insert" or not chars:
            chars[at:at] = list(piece)
        elif kind == "delete":
            del chars[min(at, len(chars) - 1)]
        else:
            chars[min(at, len(chars) - 1)] = piece
    return "".join(chars)


@fuzz(150)
@given(data=st.data())
def test_fuzz_config_file_mutated_text_is_a_config_or_one_error(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(_mutate(FULL_CONFIG, data), encoding="utf-8", errors="surrogatepass")
    _user_error_or_valid(lambda: load_config(path))


@fuzz(150)
@given(section=st.sampled_from(sorted(k for k, v in DEFAULTS.items() if isinstance(v, dict))), data=st.data())
def test_fuzz_config_file_with_a_random_value_is_a_config_or_one_error(tmp_path, section, data):
    cfg = copy.deepcopy(to_plain(DEFAULTS))
    key = data.draw(st.sampled_from(sorted(cfg[section])))
    cfg[section][key] = data.draw(yaml_values)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    _user_error_or_valid(lambda: load_config(path))


# --- the override parser ---------------------------------------------------------------------------------------

keys = st.sampled_from(
    [
        "train.lr",
        "train.lr_steps",
        "data.train_scale",
        "seed",
        "model.options.width",
        "data.frames",
        "train",
        "model.options",
        "test.checkpoint",
        "x.y",
        "",
        "train.lr.x",
    ]
)


@fuzz(200)
@given(key=keys, value=st.one_of(st.text(max_size=20), yaml_values.map(lambda v: json.dumps(v))))
def test_fuzz_override_is_applied_or_one_error(key, value):
    cfg = copy.deepcopy(DEFAULTS)
    item = f"{key}={value}"

    def apply():
        apply_override(cfg, item)
        return build_config(cfg)

    _user_error_or_valid(apply)


# --- the video-list reader -------------------------------------------------------------------------------------

list_lines = st.lists(
    st.one_of(
        st.text(max_size=30),
        st.builds(
            lambda p, labels: f"{p} {labels}",
            st.text(min_size=1, max_size=12),
            st.lists(st.integers(-3, 30), min_size=1, max_size=3).map(lambda ls: ",".join(map(str, ls))),
        ),
    ),
    max_size=6,
)


@fuzz(200)
@given(lines=list_lines, multi_label=st.booleans(), junk=st.binary(max_size=4))
def test_fuzz_video_list_is_read_alike_by_the_dataset_and_prepare_videos_or_one_error(
    tmp_path, lines, multi_label, junk
):
    path = tmp_path / "list.txt"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + junk)
    dataset = _user_error_or_valid(lambda: read_video_list(path, num_classes=31, multi_label=multi_label))
    prepare = _user_error_or_valid(lambda: read_list_lines(path, multi_label=multi_label))
    if isinstance(dataset, list):  # what the dataset reads, prepare-videos reads with the same paths
        assert [e[0] for e in dataset] == [ln.path for ln in prepare if ln.path is not None]
    elif isinstance(prepare, Exception) and "out of range" not in str(dataset):
        assert str(prepare) == str(dataset)  # the same rule refuses the same line with the same words


# --- the COCO reader -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, dict]:
    from nonlocalnet.detection.synthetic import make_builtin_coco

    root = tmp_path_factory.mktemp("coco")
    images, ann = make_builtin_coco("figures", root, num_images=2, image_size=64)
    return Path(images), json.loads(Path(ann).read_text())


def _paths(value, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, prefix + (i,))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@fuzz(150)
@given(data=st.data())
def test_fuzz_coco_file_with_a_random_field_is_read_or_one_error(tmp_path, coco, data):
    from nonlocalnet.detection.coco import CocoDetection

    images, original = coco
    ann = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from([p for p in _paths(ann) if p]))
        node = ann
        for part in path[:-1]:
            node = node[part]
        if data.draw(st.booleans()) and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = data.draw(json_values)
    file = tmp_path / "ann.json"
    file.write_text(json.dumps(ann))

    def read():
        dataset = CocoDetection(images, file, keypoints=True, train=True)
        return [dataset[i] for i in range(len(dataset))]  # every item reads, or the error names what

    _user_error_or_valid(read)


@fuzz(100)
@given(raw=st.binary(max_size=200))
def test_fuzz_coco_file_of_random_bytes_is_one_error(tmp_path, raw):
    from nonlocalnet.detection.coco import read_coco

    file = tmp_path / "ann.json"
    file.write_bytes(raw)
    assert isinstance(_user_error_or_valid(lambda: read_coco(file)), Exception)
