"""The Caffe2 converter on pickles written here in the official layout (facebookresearch/video-nonlocal-net)."""
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nonlocalnet.cli import main as cli_main
from nonlocalnet.models import create_model, load_weights
from nonlocalnet.models.caffe2 import Caffe2ConversionError, convert_caffe2_blobs, load_caffe2_pickle
from nonlocalnet.models.weights import read_metadata

LAYERS = (2, 4, 6, 2)  # holds the R50 5-block placement; tiny width keeps the files small
WIDTH = 4
# the official code's temporal-kernel switches ("use_temp_convs") of I3D R50, cut to LAYERS
I3D_TEMP = {2: [1, 1], 3: [1, 0, 1, 0], 4: [1, 0, 1, 0, 1, 0], 5: [0, 1]}
C2D_TEMP = {s: [0] * n for s, n in zip((2, 3, 4, 5), LAYERS)}
NL5 = {3: (1, 3), 4: (1, 3, 5)}


def official_blobs(temp_convs, nonlocal_after, num_classes=7, affine=False, nonlocal_bn=True, seed=0,
                   training_state=True):
    """Blobs named and shaped as the official resnet_video_org.py / resnet_helper.py / nonlocal_helper.py make them."""
    rng = np.random.default_rng(seed)
    blobs = {}

    def conv(name, shape):
        blobs[name + "_w"] = rng.standard_normal(shape).astype(np.float32) * 0.1

    def bn(name, channels):
        blobs[name + "_s"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        blobs[name + "_b"] = rng.standard_normal(channels).astype(np.float32) * 0.1
        if not affine:
            blobs[name + "_rm"] = rng.standard_normal(channels).astype(np.float32) * 0.1
            blobs[name + "_riv"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)

    kt = 5 if any(any(v) for v in temp_convs.values()) else 1
    conv("conv1", (WIDTH, 3, kt, 7, 7))
    bn("res_conv1_bn", WIDTH)
    dim_in = WIDTH
    for stage in (2, 3, 4, 5):
        inner = WIDTH * 2 ** (stage - 2)
        dim_out = 4 * inner
        for idx, use_temp in enumerate(temp_convs[stage]):
            prefix = f"res{stage}_{idx}"
            conv(prefix + "_branch2a", (inner, dim_in, 1 + 2 * use_temp, 1, 1))
            bn(prefix + "_branch2a_bn", inner)
            conv(prefix + "_branch2b", (inner, inner, 1, 3, 3))
            bn(prefix + "_branch2b_bn", inner)
            conv(prefix + "_branch2c", (dim_out, inner, 1, 1, 1))
            bn(prefix + "_branch2c_bn", dim_out)
            if idx == 0:  # dim_in != dim_out (res2) or stride 2 (res3..res5)
                conv(prefix + "_branch1", (dim_out, dim_in, 1, 1, 1))
                bn(prefix + "_branch1_bn", dim_out)
            dim_in = dim_out
            if idx in nonlocal_after.get(stage, ()):
                nl = f"nonlocal_conv{stage}_{idx}"
                for part, shape in (("theta", (dim_out // 2, dim_out)), ("phi", (dim_out // 2, dim_out)),
                                    ("g", (dim_out // 2, dim_out)), ("out", (dim_out, dim_out // 2))):
                    conv(f"{nl}_{part}", shape + (1, 1, 1))
                    blobs[f"{nl}_{part}_b"] = rng.standard_normal(shape[0]).astype(np.float32) * 0.1
                if nonlocal_bn:
                    bn(f"{nl}_bn", dim_out)
    blobs["pred_w"] = rng.standard_normal((num_classes, dim_in)).astype(np.float32) * 0.01
    blobs["pred_b"] = rng.standard_normal(num_classes).astype(np.float32) * 0.01
    if training_state:
        for name in [n for n in blobs if n.endswith(("_w", "_b", "_s"))]:
            blobs[name + "_momentum"] = np.zeros_like(blobs[name])
        blobs["lr"] = np.array(0.01, dtype=np.float32)
        blobs["model_iter"] = np.array(400000)
    return blobs


def fold_bn(blobs):
    """The official modify_caffe2_ftvideo.py: BN -> affine, s' = s / sqrt(riv + 1e-5), b' = b - rm s'."""
    out = {k: v for k, v in blobs.items() if not k.endswith(("_rm", "_riv"))}
    for name in [k[:-3] for k in blobs if k.endswith("_rm")]:
        std = np.sqrt(blobs[name + "_riv"] + 1e-5)
        out[name + "_s"] = blobs[name + "_s"] / std
        out[name + "_b"] = blobs[name + "_b"] - blobs[name + "_rm"] * blobs[name + "_s"] / std
    return out


def write_pickle(path, blobs, wrapped=True):
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs} if wrapped else blobs, f, protocol=2)  # the py2 era protocol
    return path


def tiny(name, **overrides):
    return create_model(name, layers=LAYERS, width=WIDTH, **overrides)


def convert(tmp_path, blobs, model, *extra, wrapped=True):
    src = write_pickle(tmp_path / "model.pkl", blobs, wrapped)
    out = tmp_path / "model.safetensors"
    code = cli_main(["convert-caffe2", str(src), str(out), "--model", model, "--set", f"layers={list(LAYERS)}",
                     "--set", f"width={WIDTH}", *extra])
    return code, out


def check_placed(model, blobs, affine=False):
    """Every model tensor holds its blob, checked through module attributes (not the converter's name table)."""
    def same(tensor, name):
        np.testing.assert_array_equal(tensor.detach().numpy().reshape(blobs[name].shape), blobs[name], err_msg=name)

    def norm(module, name):
        same(module.weight, name + "_s")
        same(module.bias, name + "_b")
        if not affine:
            same(module.running_mean, name + "_rm")
            same(module.running_var, name + "_riv")

    same(model.conv1.weight, "conv1_w")
    norm(model.bn1, "res_conv1_bn")
    for stage in (2, 3, 4, 5):
        res = getattr(model, f"res{stage}")
        for idx in range(res.depth):
            block, prefix = res[idx], f"res{stage}_{idx}"
            for part in "abc":
                same(getattr(block, f"conv_{part}").weight, f"{prefix}_branch2{part}_w")
                norm(getattr(block, f"bn_{part}"), f"{prefix}_branch2{part}_bn")
            if block.shortcut is not None:
                same(block.shortcut.conv.weight, f"{prefix}_branch1_w")
                norm(block.shortcut.bn, f"{prefix}_branch1_bn")
        for idx in res.nonlocal_after:
            nl, prefix = getattr(res, f"nl{idx}"), f"nonlocal_conv{stage}_{idx}"
            for part in ("theta", "phi", "g", "out"):
                same(getattr(nl, part).weight, f"{prefix}_{part}_w")
                same(getattr(nl, part).bias, f"{prefix}_{part}_b")
            if nl.norm_type == "batch":
                norm(nl.norm, f"{prefix}_bn")
    same(model.head.fc.weight, "pred_w")
    same(model.head.fc.bias, "pred_b")


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
    assert cli_main(["convert-caffe2", str(tmp_path / "nope.pkl"), str(tmp_path / "o.safetensors"),
                     "--model", "c2d_r50"]) == 2
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
