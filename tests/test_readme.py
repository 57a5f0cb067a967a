"""The README's quickstart code runs as written and says what it returns."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_block_quickstart_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    quickstart = next(b for b in blocks if "NonLocalBlock(1024" in b)
    scope: dict = {}
    exec(compile(quickstart, "README.md", "exec"), scope)
    block, x, z, attn = scope["block"], scope["x"], scope["z"], scope["attn"]
    assert attn.shape == (2, 784, 196) and z.shape == x.shape
    torch.testing.assert_close(block.eval()(x), x)  # identity at init, as the comment says
