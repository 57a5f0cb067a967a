"""The Caffe2 converter on pickles written here in the official layout (facebookresearch/video-nonlocal-net)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nonlocalnet.cli import main as cli_main
from nonlocalnet.models import create_model, load_weights
from nonlocalnet.models.checkpoints.caffe2 import Caffe2ConversionError, convert_caffe2_blobs, load_caffe2_pickle
from nonlocalnet.models.checkpoints.weights import read_metadata

from .helpers import (
    C2D_TEMP,
    CAFFE2_LAYERS,
    CAFFE2_WIDTH,
    I3D_TEMP,
    NL5,
    check_placed,
    fold_bn,
    official_blobs,
    write_pickle,
)


def tiny(name, **overrides):
    return create_model(name, layers=CAFFE2_LAYERS, width=CAFFE2_WIDTH, **overrides)


def convert(tmp_path, blobs, model, *extra, wrapped=True):
    src = write_pickle(tmp_path / "model.pkl", blobs, wrapped)
    out = tmp_path / "model.safetensors"
    code = cli_main(
        [
            "convert-caffe2",
            str(src),
            str(out),
            "--model",
            model,
            "--set",
            f"layers={list(CAFFE2_LAYERS)}",
            "--set",
            f"width={CAFFE2_WIDTH}",
            *extra,
        ]
    )
    return code, out


def test_nl_i3d_checkpoint_converts_and_loads_exactly(tmp_path):
    blobs = official_blobs(I3D_TEMP, NL5)
    code, out = convert(tmp_path, blobs, "nl_i3d_r50", "--num-classes", "7")
    assert code == 0
    model = tiny("nl_i3d_r50", num_classes=7)
    load_weights(model, out)  # strict: every entry filled, nothing extra
    check_placed(model, blobs)
    assert read_metadata(out)["model"] == "nl_i3d_r50"


def test_flat_pickle_and_class_count_from_pred_w(tmp_path):
    blobs = official_blobs(C2D_TEMP, {}, num_classes=157, training_state=False)
    src = write_pickle(tmp_path / "flat.pkl", blobs, wrapped=False)
    assert set(load_caffe2_pickle(src)) == set(blobs)
    model = tiny("c2d_r50", num_classes=157)
    result = convert_caffe2_blobs(load_caffe2_pickle(src), model)
    model.load_state_dict(result.state_dict)
    check_placed(model, blobs)


def test_frozen_bn_affine_checkpoint_fills_frozen_and_nonlocal_without_norm(tmp_path):
    blobs = fold_bn(official_blobs(I3D_TEMP, NL5, nonlocal_bn=False))
    assert not any(k.endswith("_rm") for k in blobs)
    code, out = convert(tmp_path, blobs, "nl_i3d_r50_128x1", wrapped=False)
    assert code == 0 and read_metadata(out)["affine"] == "yes"
    model = tiny("nl_i3d_r50_128x1", num_classes=7)
    load_weights(model, out)
    check_placed(model, blobs, affine=True)
    assert torch.count_nonzero(model.res3[0].bn_a.running_mean) == 0


def test_affine_file_computes_what_the_bn_file_computes(tmp_path):
    # the same trained network, saved with BN statistics and folded by the official script
    blobs = official_blobs(I3D_TEMP, {}, seed=3)
    bn_model = tiny("i3d_r50", num_classes=7).eval()
    bn_model.load_state_dict(convert_caffe2_blobs(blobs, bn_model).state_dict)
    affine_model = tiny("i3d_r50_128x1", num_classes=7).eval()
    affine_model.load_state_dict(convert_caffe2_blobs(fold_bn(blobs), affine_model).state_dict)
    x = torch.randn(1, 3, 32, 64, 64)
    with torch.no_grad():
        expected = bn_model(x)
        torch.testing.assert_close(affine_model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_an_unplaced_blob_is_refused_by_name(tmp_path, capsys):
    blobs = official_blobs(C2D_TEMP, {})
    blobs["res6_0_branch2a_w"] = np.zeros((1, 1, 1, 1, 1), np.float32)
    code, out = convert(tmp_path, blobs, "c2d_r50")
    assert code == 2 and not out.exists()
    assert "error: " in (err := capsys.readouterr().err) and "no place for: res6_0_branch2a_w" in err


def test_an_unfilled_model_entry_is_refused_by_name():
    blobs = official_blobs(I3D_TEMP, NL5)
    del blobs["nonlocal_conv4_3_phi_b"]
    with pytest.raises(Caffe2ConversionError, match=r"res4\.nl3\.phi\.bias \(blob nonlocal_conv4_3_phi_b\)"):
        convert_caffe2_blobs(blobs, tiny("nl_i3d_r50", num_classes=7))


def test_a_checkpoint_of_another_arch_or_layout_is_refused():
    i3d = official_blobs(I3D_TEMP, NL5)
    with pytest.raises(Caffe2ConversionError, match=r"wrong shape.*res2_0_branch2a_w \(4, 4, 3, 1, 1\)"):
        convert_caffe2_blobs(i3d, tiny("nl_c2d_r50", num_classes=7))
    with pytest.raises(Caffe2ConversionError, match="no place for: nonlocal_conv3_1_bn_b"):
        convert_caffe2_blobs(i3d, tiny("nl_i3d_r50_128x1", num_classes=7))  # its blocks have no norm
    with pytest.raises(Caffe2ConversionError, match="no counterpart in the official networks"):
        convert_caffe2_blobs(official_blobs(C2D_TEMP, {4: (4,)}), tiny("nl1_c2d_r50_concatenation", num_classes=7))


def test_a_half_folded_norm_is_not_mistaken_for_an_affine_one():
    blobs = official_blobs(C2D_TEMP, {})
    del blobs["res3_1_branch2b_bn_riv"]  # rm still there: a damaged file, not a frozen-BN one
    with pytest.raises(Caffe2ConversionError, match="res3.1.bn_b.running_var"):
        convert_caffe2_blobs(blobs, tiny("c2d_r50", num_classes=7))


def test_a_checkpoint_without_classifier_needs_skip_classifier(tmp_path, capsys):
    blobs = official_blobs(I3D_TEMP, {})
    del blobs["pred_w"], blobs["pred_b"]
    code, out = convert(tmp_path, blobs, "i3d_r50")
    assert code == 2 and "head.fc.weight (blob pred_w)" in capsys.readouterr().err
    code, out = convert(tmp_path, blobs, "i3d_r50", "--skip-classifier")
    assert code == 0
    assert not any(k.startswith("head.") for k in load_file(out))
    model = tiny("i3d_r50", num_classes=7)
    missing, unexpected = load_weights(model, out, strict=False)
    assert sorted(missing) == ["head.fc.bias", "head.fc.weight"] and not unexpected


def test_unreadable_files_are_clear_errors(tmp_path, capsys):
    assert (
        cli_main(["convert-caffe2", str(tmp_path / "nope.pkl"), str(tmp_path / "o.safetensors"), "--model", "c2d_r50"])
        == 2
    )
    assert "error: no checkpoint at" in capsys.readouterr().err
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(Caffe2ConversionError, match="not a readable pickle"):
        load_caffe2_pickle(bad)


def test_converted_checkpoints_run_in_the_official_network(tmp_path):
    # the official builders pad pool1 by 0 (55x55 after pool1 at 224²); Table 1 and our default pad 1 (56x56)
    from nonlocalnet.viz.loading import load_model

    blobs = official_blobs(I3D_TEMP, NL5)
    code, out = convert(tmp_path, blobs, "nl_i3d_r50", "--num-classes", "7")
    assert code == 0 and json.loads(read_metadata(out)["model_options"])["clip"] == "32x2_official"
    model, _ = load_model(out)  # rebuilt from the file's own record
    assert model.clip_name == "32x2_official" and model.pool1.padding == (0, 0, 0)
    check_placed(model, blobs)
    pooled = model.pool1(model.relu(model.bn1(model.conv1(torch.zeros(1, 3, 8, 224, 224)))))
    assert pooled.shape[-2:] == (55, 55)
    # --paper-layout keeps the paper's network (same weights)
    paper = tmp_path / "paper"
    paper.mkdir()
    code, out = convert(paper, blobs, "nl_i3d_r50", "--num-classes", "7", "--paper-layout")
    model, _ = load_model(out)
    assert code == 0 and model.clip_name == "32x2" and model.pool1.padding == (0, 1, 1)
