"""The student's EMA: EDM's ramp-up (``ema.halflife_ratio``) against EDM's own training-loop update,
written here in images as EDM writes it (Karras et al., 2022, training/training_loop.py)."""
import math

import pytest
import torch
from torch import nn

from stepdistill.train.config import EMAConfig
from stepdistill.train.ema import StudentEMA


def _edm_reference(values, *, batch, ratio, halflife_kimg):
    """EDM: halflife_nimg = min(halflife_kimg * 1000, cur_nimg * ratio); beta = 0.5 ** (batch / halflife_nimg),
    the EMA taking the new weights with weight 1 - beta (cur_nimg counts images before this update)."""
    ema, cur_nimg = None, 0
    for v in values:
        halflife = min(halflife_kimg * 1000, cur_nimg * ratio)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        ema = v if ema is None else v + (ema - v) * beta
        cur_nimg += batch
    return ema


@pytest.mark.parametrize("steps", [1, 7, 300])
def test_halflife_ratio_matches_edm_loop(steps):
    batch, ratio, halflife_kimg = 64, 0.05, 2.0
    cap = 0.5 ** (batch / (halflife_kimg * 1000))  # EDM's fixed half-life as a decay per update
    net = nn.Linear(3, 2)
    ema = StudentEMA(net, EMAConfig(decay=cap, halflife_ratio=ratio))
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(steps):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).float())
        seen.append({n: p.detach().double().clone() for n, p in net.named_parameters()})
        ema.step()
    for name, shadow in ema.shadow().items():
        ref = _edm_reference([s[name] for s in seen], batch=batch, ratio=ratio, halflife_kimg=halflife_kimg)
        torch.testing.assert_close(shadow.double(), ref, rtol=1e-5, atol=1e-6)
    if steps == 300:  # past 300 * 64 * 0.05 = 960 images the ramp is below the cap: not diffusers' schedule
        assert ema.ema.cur_decay_value == pytest.approx(0.5 ** (1 / (ratio * 299)))
        assert ema.ema.cur_decay_value < 300 / 309


def test_halflife_ratio_state_round_trips():
    net = nn.Linear(3, 2)
    a = StudentEMA(net, EMAConfig(decay=0.999, halflife_ratio=0.05))
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        a.step()
    b = StudentEMA(net, EMAConfig(decay=0.999, halflife_ratio=0.05))
    b.load({k: v.clone() for k, v in a.shadow().items()}, a.scalars())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    a.step(), b.step()
    for (_, x), (_, y) in zip(a.shadow().items(), b.shadow().items()):
        assert torch.equal(x, y)
    assert a.ema.cur_decay_value == pytest.approx(0.5 ** (1 / (0.05 * 5)))
    assert math.isfinite(b.ema.cur_decay_value)
