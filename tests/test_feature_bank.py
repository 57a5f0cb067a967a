"""The long-term feature bank: the operator, the bank on disk, the builder, the long-video task and its demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nonlocalnet.bank.build import build_feature_bank, clip_starts, pooled_features
from nonlocalnet.bank.heads import ClipOnlyHead, PooledBankHead
from nonlocalnet.bank.longvideo import NUM_SHAPES, LongVideoTask
from nonlocalnet.bank.store import FeatureBank
from nonlocalnet.bank.train import BankSamples, evaluate_head, train_head
from nonlocalnet.layers.feature_bank import FeatureBankClassifier, FeatureBankLayer, FeatureBankOperator

# --- the operator -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_shape", [(3, 16), (3, 16, 5)])
def test_operator_is_identity_at_init_on_the_clip_path(clip_shape):
    op = FeatureBankOperator(16, 24, inter_channels=32).train()  # dropout active: the zero branch stays zero
    clip, bank = torch.randn(clip_shape), torch.randn(3, 24, 7)
    torch.testing.assert_close(op(clip, bank), clip, rtol=0, atol=0)


def test_operator_gives_every_parameter_a_gradient_after_one_step():
    head = FeatureBankClassifier(16, 24, 5, inter_channels=32, dropout=0.0, head_dropout=0.0)
    clip, bank, label = torch.randn(4, 16), torch.randn(4, 24, 6), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(2):  # W_out starts at zero: after one step every path carries gradient
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(clip, bank), label).backward()
        optimizer.step()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_layer_equals_the_formula_written_out():
    layer = FeatureBankLayer(6, 5, inter_channels=4, dropout=0.0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x, bank = torch.randn(2, 6, 3), torch.randn(2, 5, 7)
    z, weights = layer(x, bank, return_attention=True)
    for b in range(2):
        theta = layer.theta.weight[:, :, 0] @ x[b] + layer.theta.bias[:, None]  # (4, 3)
        phi = layer.phi.weight[:, :, 0] @ bank[b] + layer.phi.bias[:, None]  # (4, 7)
        g = layer.g.weight[:, :, 0] @ bank[b] + layer.g.bias[:, None]  # (4, 7)
        attn = torch.softmax(theta.t() @ phi * 4**-0.5, dim=1)  # (3, 7), scale C'^-0.5
        y = g @ attn.t()  # (4, 3)
        y = nn.functional.layer_norm(y.t(), (4,), layer.norm.weight, layer.norm.bias).t()
        expected = x[b] + layer.out.weight[:, :, 0] @ torch.relu(y) + layer.out.bias[:, None]
        torch.testing.assert_close(z[b], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights[b], attn, atol=1e-6, rtol=1e-5)
    # the fast path (no weights asked) gives the same output
    torch.testing.assert_close(layer(x, bank), z, atol=1e-5, rtol=1e-5)


def test_layer_attention_equals_the_nonlocal_block_over_a_memory():
    """One definition of the maths: the layer's attention is NonLocalBlock(memory=bank)'s with the same θ, φ, g."""
    from nonlocalnet.layers import NonLocal1d

    layer = FeatureBankLayer(6, 5, inter_channels=6, dropout=0.0).eval()
    block = NonLocal1d(6, memory_channels=5, inter_channels=6, scale="auto", norm=None).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        for name in ("theta", "phi", "g"):
            getattr(block, name).load_state_dict(getattr(layer, name).state_dict())
        block.out.weight.copy_(torch.eye(6)[:, :, None])  # W_z = identity: z - x is the block's y
        block.out.bias.zero_()
    x, bank = torch.randn(2, 6, 3), torch.randn(2, 5, 7)
    _, layer_weights = layer(x, bank, return_attention=True)
    z, block_weights = block(x, memory=bank, return_attention=True)
    torch.testing.assert_close(layer_weights, block_weights)
    y = layer.g(bank) @ layer_weights.transpose(1, 2)  # (B, C', L) @ (B, L, N) -> (B, C', N)
    torch.testing.assert_close(z - x, y, atol=1e-5, rtol=1e-5)


def test_operator_attention_is_a_softmax_over_the_bank_per_layer():
    op = FeatureBankOperator(8, 8, inter_channels=8, num_layers=3).eval()  # eval: no dropout
    with torch.no_grad():  # W_out = 0 at init would make every layer's input the clip: make them all active
        for p in op.parameters():
            p.normal_(0.0, 0.5)
    clip, bank = torch.randn(2, 8), torch.randn(2, 8, 5)
    out, weights = op(clip, bank, return_attention=True)
    assert len(weights) == 3
    for w in weights:
        assert w.shape == (2, 1, 5)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 1))
    # the layers are chained: each attends with the previous one's output, as written out here
    x, by_hand = clip.unsqueeze(-1), []
    for layer in op.layers:
        x, w = layer(x, bank, return_attention=True)
        by_hand.append(w)
    torch.testing.assert_close(out, x.squeeze(-1))
    for w, expected in zip(weights, by_hand):
        torch.testing.assert_close(w, expected)
    _, from_clip = op.layers[2](clip.unsqueeze(-1), bank, return_attention=True)
    assert not torch.allclose(weights[2], from_clip)  # (so feeding the clip to every layer would be caught)


def test_operator_rejects_wrong_shapes_and_options():
    op = FeatureBankOperator(8, 6, inter_channels=4)
    with pytest.raises(ValueError, match="clip features must be"):
        op(torch.randn(2, 7), torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="bank must be"):
        op(torch.randn(2, 8), torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="empty"):
        op(torch.randn(2, 8), torch.randn(2, 6, 0))
    with pytest.raises(ValueError, match="unknown impl"):
        FeatureBankLayer(8, 6, impl="linear")
    with pytest.raises(ValueError, match="num_layers"):
        FeatureBankOperator(8, 6, num_layers=0)


def test_classifier_concatenates_clip_and_operator_output():
    head = FeatureBankClassifier(4, 3, 2, inter_channels=4, head_dropout=0.0).eval()
    clip, bank = torch.randn(5, 4), torch.randn(5, 3, 6)
    context = head.operator(clip, bank)
    expected = torch.cat([clip, context], 1) @ head.fc.weight.t() + head.fc.bias
    torch.testing.assert_close(head(clip, bank), expected)


def test_baseline_heads_use_the_bank_as_they_say():
    clip, bank = torch.randn(3, 4), torch.randn(3, 5, 6)
    only = ClipOnlyHead(4, 2, dropout=0.0)
    torch.testing.assert_close(only(clip, bank), only(clip, torch.randn(3, 5, 6)))
    pooled = PooledBankHead(4, 5, 2, pooling="max", dropout=0.0)
    expected = pooled.fc(torch.cat([clip, bank.amax(2)], 1))
    torch.testing.assert_close(pooled(clip, bank), expected)


# --- the bank on disk and its builder -----------------------------------------------------------------------


def test_bank_round_trips_through_safetensors(tmp_path):
    bank = FeatureBank(
        {"a": torch.randn(3, 5), "b/c": torch.randn(4, 5)},
        {"a": torch.tensor([0, 8, 16]), "b/c": torch.tensor([0, 4, 8, 12])},
        {"model": "tiny"},
    )
    path = bank.save(tmp_path / "sub" / "bank.safetensors")
    loaded = FeatureBank.load(path)
    assert set(loaded.features) == {"a", "b/c"}
    for vid in bank.features:
        torch.testing.assert_close(loaded.features[vid], bank.features[vid], rtol=0, atol=0)
        torch.testing.assert_close(loaded.starts[vid], bank.starts[vid], rtol=0, atol=0)
    assert loaded.metadata["model"] == "tiny" and loaded.channels == 5
    torch.testing.assert_close(loaded.bank("a"), bank.features["a"].t())
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["bank.safetensors"]  # no temporary left


def test_bank_load_refuses_missing_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError):
        FeatureBank.load(tmp_path / "none.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a nonlocalnet feature bank"):
        FeatureBank.load(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        FeatureBank.load(tmp_path / "junk.safetensors")


def test_clip_starts_tile_the_video():
    assert clip_starts(64, 8) == [0, 8, 16, 24, 32, 40, 48, 56]
    assert clip_starts(20, 4, frame_stride=2) == [0, 7]  # a clip spans 7 frames
    assert clip_starts(10, 4, step=3) == [0, 3, 6]
    with pytest.raises(ValueError, match="shorter than one clip"):
        clip_starts(5, 8)


class _MeanFrames(nn.Module):
    """A 'video model' whose features are the per-channel, per-frame means: hand-checkable."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward_features(self, x):  # (B, C, T, H, W) -> (B, C*T, 1, 1, 1)
        return (x.mean(dim=(3, 4)) * self.scale).flatten(1)[:, :, None, None, None]


def test_builder_stores_every_clips_pooled_features(tmp_path):
    videos = [("v0", torch.randn(2, 12, 3, 3)), ("v1", torch.randn(2, 8, 3, 3))]
    bank = build_feature_bank(
        _MeanFrames(),
        videos,
        clip_frames=2,
        frame_stride=2,
        batch_size=2,
        out=tmp_path / "bank.safetensors",
        progress=False,
    )
    assert bank.starts["v0"].tolist() == [0, 3, 6, 9] and bank.starts["v1"].tolist() == [0, 3]
    frames = videos[0][1]
    expected = frames[:, 6:9:2].mean(dim=(2, 3)).flatten()  # clip 2: frames 6 and 8
    torch.testing.assert_close(bank.features["v0"][2], expected)
    loaded = FeatureBank.load(tmp_path / "bank.safetensors")
    torch.testing.assert_close(loaded.features["v1"], bank.features["v1"])
    assert loaded.metadata["frame_stride"] == "2"
    torch.testing.assert_close(
        pooled_features(_MeanFrames(), frames[None, :, :2]), frames[:, :2].mean(dim=(2, 3)).flatten()[None]
    )


# --- the long-video task -------------------------------------------------------------------------------------


def test_long_video_task_is_deterministic_and_far_apart():
    task = LongVideoTask(40, seed=3)
    again = LongVideoTask(40, seed=3)
    assert np.array_equal(task.clip(5, 2), again.clip(5, 2))
    assert not np.array_equal(task.clip(5, 2), LongVideoTask(40, seed=4).clip(5, 2))
    assert task.video(1).shape == (64, 32, 32, 3) and task.video(1).dtype == np.uint8
    for v in range(40):
        spec = task.spec(v)
        first, second = spec.event_clips
        assert second - first >= task.num_clips // 2
        assert spec.label == (spec.shapes[0] + spec.shapes[1]) % NUM_SHAPES
        assert [task.clip_label(v, c) for c in range(task.num_clips)].count(0) == task.num_clips - 2


def test_long_video_label_is_independent_of_any_single_event():
    """Over all pairs of shapes, knowing one event's shape leaves the label uniform: clips alone are at chance."""
    for first in range(NUM_SHAPES):
        labels = sorted((first + second) % NUM_SHAPES for second in range(NUM_SHAPES))
        assert labels == list(range(NUM_SHAPES))


def test_event_clips_differ_from_plain_clips():
    task = LongVideoTask(4, seed=0)
    spec = task.spec(0)
    event = task.clip(0, spec.event_clips[0]).astype(float)
    plain = task.clip(0, next(c for c in range(8) if c not in spec.event_clips)).astype(float)
    assert event.max(axis=-1).max() > 200 and (event > 200).sum() > (plain > 200).sum() + 20


def test_bank_samples_pair_each_clip_with_its_whole_video():
    bank = FeatureBank(
        {"x": torch.arange(6.0).view(3, 2), "y": torch.arange(6.0, 12.0).view(3, 2)},
        {"x": torch.arange(3), "y": torch.arange(3)},
    )
    samples = BankSamples.from_bank(bank, {"x": 1, "y": 0})
    clip, video_bank, label = samples.batch(torch.tensor([4]))  # video 1 ("y"), clip 1
    assert clip.tolist() == [[8.0, 9.0]] and label.tolist() == [0]
    assert video_bank.shape == (1, 2, 3) and video_bank[0, :, 1].tolist() == [8.0, 9.0]
    with pytest.raises(ValueError, match="no label"):
        BankSamples.from_bank(bank, {"x": 1})


def test_heads_train_to_fit_a_bank_only_task():
    """A toy bank where the label is carried by another clip of the video: the operator learns it, the clip
    alone cannot."""
    g = torch.Generator().manual_seed(0)
    videos, clips, channels = 96, 4, 8
    features = torch.randn(videos, clips, channels, generator=g) * 0.1
    labels = torch.randint(0, 2, (videos,), generator=g)
    features[torch.arange(videos), 0, 0] = 3.0  # clip 0 is the "event" clip
    features[torch.arange(videos), 0, 1] = labels.float() * 4 - 2  # its label sign
    train = BankSamples(features[:64], labels[:64], [str(i) for i in range(64)])
    test = BankSamples(features[64:], labels[64:], [str(i) for i in range(64, videos)])
    torch.manual_seed(0)
    fbo = FeatureBankClassifier(channels, channels, 2, inter_channels=16)
    train_head(fbo, train, epochs=40, lr=3e-3, progress=False)
    assert evaluate_head(fbo, test)["video_accuracy"] == 1.0


# --- the demo -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_demo_bank_beats_clip_only(tmp_path):
    from nonlocalnet.bank.demo import QUICK, format_table, run_feature_bank_demo

    result = run_feature_bank_demo(QUICK, out_dir=tmp_path, progress=False, log=lambda _: None)
    rows = {row["key"]: row for row in result["rows"]}
    clip_only = rows["clip_only"]["video_accuracy"]
    bank = rows["bank_fbo"]["video_accuracy"]
    assert clip_only < 0.5  # the label is independent of any one clip: chance is 1/3
    assert bank > clip_only + 0.25, format_table(result)
    for name in (
        "bank_train.safetensors",
        "bank_test.safetensors",
        "backbone.safetensors",
        "results.json",
        "results.md",
    ):
        assert (tmp_path / name).is_file()
    assert len(FeatureBank.load(tmp_path / "bank_test.safetensors")) == QUICK.test_videos


def test_demo_command_runs_and_reports_bad_sizes(tmp_path, capsys):
    from nonlocalnet.cli import main

    tiny = [
        "feature-bank-demo",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--threads",
        "1",
        "--backbone-videos",
        "6",
        "--train-videos",
        "8",
        "--test-videos",
        "4",
        "--num-clips",
        "4",
        "--backbone-epochs",
        "1",
        "--head-epochs",
        "1",
        "--inter-channels",
        "8",
        "--width",
        "4",
    ]
    assert main(tiny) == 0
    out = capsys.readouterr().out
    assert "| clip only (linear) |" in out and "feature bank operator" in out
    result = __import__("json").loads((tmp_path / "run" / "results.json").read_text())
    assert result["config"]["test_videos"] == 4 and [r["key"] for r in result["rows"]] == [
        "clip_only",
        "bank_avg",
        "bank_fbo",
    ]
    assert len(FeatureBank.load(tmp_path / "run" / "bank_train.safetensors")) == 8
    assert main(tiny + ["--backbone-videos", "9"]) == 2
    assert "error: backbone_videos must be in 1..train_videos (8)" in capsys.readouterr().err
