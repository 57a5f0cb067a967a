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
import os

import pytest
import torch

# Two cores on CI: one intra-op thread per test process keeps timings predictable under pytest-xdist.
torch.set_num_threads(int(os.environ.get("NONLOCALNET_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
