"""tools/consistency_fit.py's measures against exact cases: the high-frequency energy of a constant
image is 0 and of a +-1 checkerboard 8/9 inside (a 3x3 window holds 5 of the centre's sign, 4 of the
other) and 1 on the border (windows cut to 2x3 or 2x2 hold as many of each); batches keep order and
slice the condition with the noise."""
from __future__ import annotations

import pytest
import torch

from conftest import load_tool


def test_high_frequency_energy_of_exact_images():
    tool = load_tool("consistency_fit")
    assert tool.hf_energy(torch.full((2, 1, 16, 16), 0.7)) == pytest.approx(0.0, abs=1e-7)
    n = 64
    idx = torch.arange(n)
    board = ((idx[:, None] + idx[None, :]) % 2 * 2 - 1).float()[None, None]
    inside = (n - 2) ** 2
    assert tool.hf_energy(board) == pytest.approx((inside * 8 / 9 + (n * n - inside)) / (n * n), rel=1e-6)
    assert tool.rms(board, -board) == pytest.approx(2.0)


def test_batches_keep_order_and_slice_the_condition(monkeypatch):
    tool = load_tool("consistency_fit")
    monkeypatch.setattr(tool, "BATCH", 3)
    noise = torch.arange(7.0).reshape(7, 1, 1, 1)
    cond = {"class_labels": torch.arange(7) * 10}
    seen = []

    def fn(z, c):
        seen.append(len(z))
        return z + c["class_labels"].reshape(-1, 1, 1, 1)

    out = tool.batched(fn, noise, cond)
    assert seen == [3, 3, 1]
    assert torch.equal(out.flatten(), torch.arange(7.0) * 11)
    assert torch.equal(tool.batched(lambda z, c: z * 2 if c is None else None, noise, None), noise * 2)
