import pytest
import torch

from latentdiffusion.training.ema import EMA, ema_decay


def test_decay_warm_up():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.9, 10_000) == 0.9


def test_ema_follows_the_closed_form():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    expected = 0.0
    for step in range(30):
        with torch.no_grad():
            p.fill_(float(step))
        ema.update([p])
        d = ema_decay(0.9, step)
        expected = d * expected + (1 - d) * step
        assert ema.shadow[0] == pytest.approx(torch.full((3,), expected), abs=1e-5)


def test_applied_swaps_and_restores_and_state_round_trips():
    p = torch.nn.Parameter(torch.ones(2))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(3.0)
    ema.update([p])  # d = 0.1 -> 0.1 * 1 + 0.9 * 3
    with ema.applied([p]):
        assert p.tolist() == pytest.approx([2.8, 2.8])
    assert p.tolist() == [3.0, 3.0]
    other = EMA([p], decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="does not fit"):
        EMA([p, p], 0.5).load_state_dict(ema.state_dict())
