"""Issue 31's bad configs: every numeric key range-checked, every list checked element by element, YAML aliases
refused before anything expands, sizes that cannot fit in memory refused up front; each one `error:` line naming
the key and the value, exit status 2, before the run directory is touched."""

from __future__ import annotations

import time

import pytest

from nonlocalnet.cli import main
from nonlocalnet.engine.config import ConfigError, check_memory, load_config

TINY = "configs/synthetic/nl_c2d_tiny.yaml"


def _train_error(capsys, tmp_path, *overrides: str) -> str:
    """The one line `nonlocalnet train` prints for ``overrides``, after checking it wrote nothing."""
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, "progress=false", f"output_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nonlocalnet train: error: ")
    assert not out.exists()  # refused before config.yaml or TensorBoard files are written
    return err


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr_gamma=-1", "train.lr_gamma must be greater than 0 and at most 1; got -1"),
        ("train.warmup_factor=-5", "train.warmup_factor must be at least 0 and at most 1; got -5"),
        ("train.momentum=1.5", "train.momentum must be at least 0 and at most 1; got 1.5"),
        ("seed=-1", "seed must be at least 0 and at most 9,223,372,036,854,775,807; got -1"),
        (
            "seed=100000000000000000000",
            "seed must be at least 0 and at most 9,223,372,036,854,775,807; got 100000000000000000000",
        ),
        ("data.train_scale=[abc,null]", "data.train_scale[0] must be an integer; got 'abc' (in ['abc', None])"),
        ("data.train_scale=[32.5,40]", "data.train_scale[0] must be an integer; got 32.5 (in [32.5, 40])"),
        ("data.train_scale=[40,32]", "data.train_scale must be [shortest, longest] with shortest <= longest"),
        ("data.train_scale=[32]", "data.train_scale must hold 2 element(s); got 1: [32]"),
        ("train.lr_steps=[5,-1]", "train.lr_steps[1] must be at least 0; got -1"),
        ("test.checkpoint=[1]", "test.checkpoint must be a string (a path) or null; got [1]"),
        ("model.pretrained=123", "model.pretrained must be a string (a path) or null; got 123"),
    ],
)
def test_a_value_out_of_range_or_a_bad_list_element_is_one_error_line_naming_it(capsys, tmp_path, override, message):
    assert message in _train_error(capsys, tmp_path, override)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.frames=100000000000",
            "one training batch (train.batch_size=32 x 3 x data.frames=100000000000 x 32 x "
            "32) needs 36,621,093.8 GiB, more than this machine's memory",
        ),
        ("data.num_classes=1000000000000", "the classifier (data.num_classes=1000000000000 x 2048 features"),
        ("train.batch_size=100000000", "one training batch (train.batch_size=100000000 x 3"),
    ],
)
def test_sizes_that_cannot_fit_in_memory_are_refused_up_front_naming_the_size(capsys, tmp_path, override, message):
    assert message in _train_error(capsys, tmp_path, override)


def test_the_memory_check_refuses_only_what_exceeds_the_memory_it_is_given():
    cfg = load_config(
        TINY, ["train.batch_size=2", "test.batch_size=1", "data.frames=4", "data.image_size=32", "data.num_classes=1"]
    )
    check_memory(cfg, memory=4 * 2 * 3 * 4 * 32 * 32)  # float32 bytes of exactly one training batch: it fits
    with pytest.raises(ConfigError, match="one training batch"):
        check_memory(cfg, memory=4 * 2 * 3 * 4 * 32 * 32 - 1)


def test_a_yaml_alias_bomb_in_a_config_file_is_refused_before_it_expands(capsys, tmp_path):
    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}]"
        for i in range(1, 10)
    ]
    path = tmp_path / "bomb.yaml"
    path.write_text(f"base: {(tmp_path.cwd() / TINY).resolve()}\n" + "\n".join(lines) + "\ntrain:\n  lr_steps: *a9\n")
    began = time.monotonic()
    assert main(["train", "--config", str(path), f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - began < 30  # (before the fix: 86 s at full CPU, then MemoryError)
    assert f"config {path} is not valid YAML (line 3, column 10): an alias (*a0) is not accepted in a config" in err


def test_a_yaml_alias_in_an_override_is_refused(capsys, tmp_path):
    err = _train_error(capsys, tmp_path, "train.lr_steps=[&x [1], *x]")
    assert "an alias (*x) is not accepted in a config" in err


@pytest.mark.parametrize("base, shown", [("123", "123"), ("[a.yaml]", "['a.yaml']")])
def test_a_base_that_is_not_a_file_name_is_one_error_line(capsys, tmp_path, base, shown):
    path = tmp_path / "c.yaml"
    path.write_text(f"base: {base}\n")
    assert main(["train", "--config", str(path)]) == 2
    assert (
        f"config {path}: base must name one config file (a path relative to it); got {shown}" in capsys.readouterr().err
    )


def test_a_config_that_is_not_utf8_is_one_error_line_naming_file_and_line(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"seed: 1\noutput_dir: caf\xe9\n")
    assert main(["train", "--config", str(path)]) == 2
    assert f"config {path} line 2: not UTF-8 text (byte 0xe9)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr_gamma=0", "train.lr_gamma must be greater than 0 and at most 1; got 0"),
        ("train.hflip=2", "train.hflip must be at least 0 and at most 1; got 2"),
        ("data.kpt_oks_sigmas=[0.1,x]", "data.kpt_oks_sigmas[1] must be a finite number; got 'x'"),
    ],
)
def test_detection_configs_are_range_checked_too(override, message):
    from nonlocalnet.detection.config import load_config as load_detection

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_detection("tiny_shapes", [override])
