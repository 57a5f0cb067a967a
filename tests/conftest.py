"""The test suite. What a test here must do: pin a value that a plausible bug would change.

A test states the behaviour its name promises as a value computed independently of the code under test: by
hand, from a construction whose answer is known, or by another code path (the dense reference for a fast path,
a peer's own code for a conversion, a single-process run for a multi-process one). Not enough on its own:

- a range (``0 <= top1 <= 1``), a type, "no exception", a file's existence or PNG signature without its content;
- comparing a function with itself, or on the one input a result was traced / cached with;
- data on which the answer is certain anyway (2 classes make top-5 = 1; one view a video makes views = videos).

Before calling a test done, break the code the way the test's name says it guards against (swap an axis, drop
a term, skip a restore) and see the test fail. One example from the suite,
``test_the_rendered_heat_map_is_hottest_where_the_weights_are_largest`` (test_viz.py): it puts all the weight on
one key cell, reads the PNG back, and checks the hot pixels sit in that cell's corner of that frame's panel; a
transposed heat map fails it, while the older check of the PNG signature passed it.

Markers: ``slow`` (export, compile, end-to-end training: ``nox -s slow``) and ``distributed``
(several processes: run one at a time, ``nox -s distributed``, one worker).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import write_video

# Two cores on CI: one intra-op thread per test process keeps timings predictable under pytest-xdist.
torch.set_num_threads(int(os.environ.get("NONLOCALNET_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """A folder of tiny H.264 videos (one of them corrupt) with single- and multi-label train / val lists."""
    root = tmp_path_factory.mktemp("kinetics")
    rng = np.random.default_rng(0)
    for i in range(4):
        write_video(root / f"v{i}.mp4", rng.integers(0, 255, (20, 36, 44, 3), dtype=np.uint8))
    (root / "broken.mp4").write_bytes(b"\x00" * 2048)
    (root / "train.txt").write_text("v0.mp4 0\nv1.mp4 1\nbroken.mp4 2\nv2.mp4 2\n")
    (root / "val.txt").write_text("v3.mp4 1\nv0.mp4 0\n")
    (root / "train_ml.txt").write_text("v0.mp4 0,2\nv1.mp4 1\nv2.mp4 2\nv3.mp4 0,1\n")
    (root / "val_ml.txt").write_text("v3.mp4 0,1\nv1.mp4 1\nv2.mp4 2\n")  # every class: positives and negatives
    return root
