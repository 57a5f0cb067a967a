"""How a non-local block starts decides whether it learns when the network trains from scratch.

Measured on the demo's task (:class:`~nonlocalnet.data.LongRangeShapes`: two shapes far apart in space and time,
label (a + b) mod 2, which no C2D network can solve) with the demo's tiny network (one bottleneck per stage, width
8, the 8x8 clip layout, one block after res3's block) built by hand with default options, and the demo's recipe
(SGD, momentum 0.9, lr 0.1 reached over 400 warm-up iterations, weight decay 1e-4, 32 clips a batch), one thread.

A block with the official init (θ, φ, g ~ N(0, 0.01²)) sits at a saddle: the dot product θᵀφ is bilinear, its
gradients as small as its factors. With the default init ("auto": PyTorch's conv init for a block no pretrained
weights surround) the block learns the task; with the official one the dot-product block stays at chance, as the
baseline does, for most seeds. (With this recipe the embedded gaussian learns from the official init too; the test
pins that the default learns it.)
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from nonlocalnet.data import LongRangeShapes
from nonlocalnet.models import ResNet3d

ITERATIONS = 300
BATCH = 32
WARMUP = 400
TEST_CLIPS = 512


def top1_after_training(seed: int, nonlocal_options: dict | None, with_block: bool = True) -> float:
    """Top-1 on held-out clips of the demo's tiny network after ITERATIONS steps of the demo's recipe."""
    torch.manual_seed(seed)
    model = ResNet3d(
        (1, 1, 1, 1),
        arch="c2d",
        clip="8x8",
        width=8,
        num_classes=2,
        dropout=0.0,
        nonlocal_locations={"res3": (0,)} if with_block else None,
        nonlocal_options=nonlocal_options,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    for i, batch in enumerate(
        DataLoader(LongRangeShapes(BATCH * ITERATIONS, split="train", seed=seed), batch_size=BATCH)
    ):
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * min(1.0, (i + 1) / WARMUP)
        loss = torch.nn.functional.cross_entropy(model(batch["clip"]), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(LongRangeShapes(TEST_CLIPS, split="test", seed=seed), batch_size=128):
            correct += int((model(batch["clip"]).argmax(dim=1) == batch["label"]).sum())
    return correct / TEST_CLIPS


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_a_block_trained_from_scratch_learns_with_the_default_init_where_the_official_one_stalls(one_thread):
    """The claim holds for most seeds, not for every one: at this learning rate the training is chaotic. Two runs
    whose block differs only in the summation order of its projections (one stacked convolution against three)
    drift apart from 1e-6 after ten steps by about a hundredfold every ten steps, and such a run can end either
    way; so the test asks for two seeds of three."""
    results = {
        seed: dict(
            baseline=top1_after_training(seed, None, with_block=False),
            default=top1_after_training(seed, {"mode": "dot_product"}),
            official=top1_after_training(seed, {"mode": "dot_product", "init": "official"}),
            embedded_gaussian=top1_after_training(seed, None),  # every option at its default
        )
        for seed in SEEDS
    }
    print(results)
    assert all(r["baseline"] < 0.65 for r in results.values())  # no C2D solves the task: chance is 0.5
    assert all(r["embedded_gaussian"] > 0.85 for r in results.values())  # learnt: far above chance
    assert sum(r["default"] > 0.9 for r in results.values()) >= 2  # the dot product from the default init learns
    assert sum(r["official"] < 0.65 for r in results.values()) >= 2  # the official init's saddle: it stays at chance
