import os

import pytest
import torch

# Two cores on CI: one intra-op thread per test process keeps timings predictable under pytest-xdist.
torch.set_num_threads(int(os.environ.get("NONLOCALNET_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
