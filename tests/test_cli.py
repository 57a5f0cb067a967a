"""The command line: every listed command imports and has help."""
from __future__ import annotations

import importlib

import pytest

from nonlocalnet.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_module_with_arguments_and_run(name):
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.add_arguments) and callable(module.run)


def test_usage_lists_the_commands_and_unknown_is_named(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("compare", "train", "test", "visualize", "detect-train"))
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
