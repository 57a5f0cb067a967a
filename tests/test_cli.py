"""The command line: every command documents its options, and every command is run end to end somewhere."""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

from nonlocalnet.cli import COMMANDS, main

# where each command runs on tiny inputs and its promised output (exit status, file, table) is checked
END_TO_END = {
    "demo": ("tests.test_train", "test_demo_compares_all_variants_and_writes_table"),
    "train": ("tests.test_train", "test_cli_train_then_test_prints_and_writes_json"),
    "test": ("tests.test_train", "test_cli_train_then_test_prints_and_writes_json"),
    "flops": ("tests.test_flops", "test_cli_prints_table_and_totals_for_an_8_frame_clip"),
    "cost": ("tests.test_cost", "test_cost_command_prints_the_table_and_writes_json"),
    "attention": ("tests.test_attention_diagnostics", "test_attention_command_prints_the_table_draws_and_writes_json"),
    "convert": ("tests.test_zoo_convert", "_convert"),
    "convert-caffe2": ("tests.test_caffe2", "convert"),
    "visualize": ("tests.test_viz", "test_visualize_command_end_to_end"),
    "feature-bank-demo": ("tests.test_feature_bank", "test_demo_command_runs_and_reports_bad_sizes"),
    "detect-train": (
        "tests.test_detection",
        "test_cli_detect_train_and_detect_test_follow_the_conventions_of_train_and_test",
    ),
    "detect-test": (
        "tests.test_detection",
        "test_cli_detect_train_and_detect_test_follow_the_conventions_of_train_and_test",
    ),
    "models": ("tests.test_first_steps", "test_models_command_lists_names_with_parameters_clip_and_blocks"),
    "prepare-videos": (
        "tests.test_prepare_videos",
        "test_cli_prepares_a_list_reports_a_corrupt_video_and_the_dataset_reads_the_new_list",
    ),
    "predict": ("tests.test_predict", "test_multi_view_scores_are_the_mean_of_the_views_computed_by_hand"),
    "extract": ("tests.test_predict", "test_extract_gives_forward_features_of_every_clip"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_runs_and_documents_every_option(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: nonlocalnet {name}") and COMMANDS[name][1] in " ".join(text.split())
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        shown = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        assert shown in text, (name, shown)
        assert action.help, f"{name}: {shown} has no help text"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_run_end_to_end_by_a_test(name):
    module, function = END_TO_END[name]  # a KeyError here: a new command without an end-to-end test
    source = inspect.getsource(getattr(importlib.import_module(module), function))
    assert f'"{name}"' in source, f"{module}.{function} does not run `nonlocalnet {name}`"


def test_usage_lists_the_commands_and_unknown_is_named(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


# the commands that take overrides, with the arguments they need besides
OVERRIDES = {
    "train": [],
    "test": [],
    "demo": [],
    "detect-train": [],
    "detect-test": ["--checkpoint", "model_final.safetensors"],
    "convert": ["in.pkl", "out.safetensors"],
    "convert-caffe2": ["in.pkl", "out.safetensors"],
    "flops": ["c2d_r50"],
    "visualize": ["--checkpoint", "w.safetensors", "--video", "v.mp4"],
    "predict": ["v.mp4", "--checkpoint", "w.safetensors"],
    "extract": ["v.mp4", "--checkpoint", "w.safetensors", "--out", "f.safetensors"],
    "cost": ["c2d_r50"],
    "attention": ["v.mp4"],
}


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_every_command_takes_overrides_in_one_syntax(name):
    from nonlocalnet.commands import overrides_of

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    args = parser.parse_intermixed_args(OVERRIDES[name] + ["--set", "a.b=[1, 2]", "--set", "c=x"])
    assert overrides_of(args) == ["a.b=[1, 2]", "c=x"]
    if "overrides" in vars(args):  # a command that runs a config takes bare words too, applied first
        args = parser.parse_intermixed_args(OVERRIDES[name] + ["--set", "c=x", "a.b=1"])
        assert overrides_of(args) == ["a.b=1", "c=x"]


def test_model_options_are_yaml_values_as_in_a_config(capsys):
    assert (
        main(
            [
                "flops",
                "nl_c2d_r50",
                "--clip",
                "8x32x32",
                "--set",
                "layers=[1,1,1,1]",
                "--set",
                "width=4",
                "--set",
                "nonlocal_locations={res4: [0]}",
                "--set",
                "clip=8x8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("nl_c2d_r50: clip layout 8x8") and "res4.nl0" in out
    # the Python-literal dialect is gone: a tuple is no YAML list, and the error says how to write one
    assert main(["flops", "nl_c2d_r50", "--set", "layers=(1,1,1,1)"]) == 2
    assert "override 'layers=(1,1,1,1)': write a sequence as a YAML list, [1,1,1,1]" in capsys.readouterr().err
