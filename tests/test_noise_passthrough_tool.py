"""tools/noise_passthrough.py against exact cases: a flow teacher whose velocity network outputs 0
returns its input as x0 (x0 = x - sigma v = z at sigma 1): slope 1, R^2 1, spread the noise's own."""
from __future__ import annotations

import pytest
import torch

from conftest import load_tool, tiny_unet2d
from stepdistill.denoisers import DiffusersDenoiser
from stepdistill.schedules import FlowSchedule


def test_a_network_that_passes_its_noise_through_scores_slope_one():
    net = tiny_unet2d(num_class_embeds=3)
    with torch.no_grad():
        net.conv_out.weight.zero_()
        net.conv_out.bias.zero_()
    teacher = DiffusersDenoiser(net, FlowSchedule({"shift": 1.0}), null_class=2)
    teacher.meta = {"num_classes": 2}
    res = load_tool("noise_passthrough").passthrough(teacher, num=512)
    assert res["t"] == 1000.0
    assert res["slope"] == pytest.approx(1.0, abs=1e-5) and res["r2"] == pytest.approx(1.0, abs=1e-5)
    assert res["rms"] == pytest.approx(1.0, abs=0.05)  # the spread of unit noise
    with torch.no_grad():  # a constant velocity: x0 = z - c, the same slope, the same spread
        net.conv_out.bias.fill_(0.3)
    res = load_tool("noise_passthrough").passthrough(teacher, num=512)
    assert res["slope"] == pytest.approx(1.0, abs=1e-5) and res["rms"] == pytest.approx(1.0, abs=0.05)
