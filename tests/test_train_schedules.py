"""Warm-up + linear decay schedule values at its boundaries, alone and driven by LambdaLR."""

from __future__ import annotations

import pytest
import torch

from vgskit.errors import ConfigError
from vgskit.train.config import TrainConfig
from vgskit.train.schedules import WarmupLinearDecay, build_scheduler, resolve_warmup_steps


def test_factor_at_boundaries():
    f = WarmupLinearDecay(warmup_steps=4, max_steps=12, lr=1e-3, end_lr=1e-4)
    assert f(0) == 0.0
    assert f(1) == pytest.approx(0.25)
    assert f(3) == pytest.approx(0.75)
    assert f(4) == pytest.approx(1.0)  # peak exactly at the end of warm-up
    assert f(8) == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2
    assert f(12) == pytest.approx(0.1)  # end_lr / lr at max_steps
    assert f(20) == pytest.approx(0.1)  # and constant afterwards
    values = [f(s) for s in range(13)]
    assert values[:5] == sorted(values[:5]) and values[4:] == sorted(values[4:], reverse=True)


def test_no_warmup_and_all_warmup():
    f = WarmupLinearDecay(0, 10, lr=1.0, end_lr=0.0)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == 0.0
    g = WarmupLinearDecay(5, 5, lr=1.0, end_lr=0.2)
    assert g(0) == 0.0 and g(4) == pytest.approx(0.8) and g(5) == pytest.approx(0.2)


def test_invalid_arguments():
    with pytest.raises(ConfigError, match="warmup_steps"):
        WarmupLinearDecay(11, 10, 1.0)
    with pytest.raises(ConfigError, match="max_steps"):
        WarmupLinearDecay(0, 0, 1.0)
    with pytest.raises(ConfigError, match="end_lr"):
        WarmupLinearDecay(0, 10, 1.0, end_lr=2.0)


def test_lambdalr_lr_per_update_and_state_dict():
    cfg = TrainConfig(lr=0.1, end_lr=0.01, warmup_fraction=0.2, max_steps=10)
    assert resolve_warmup_steps(cfg, 10) == 2
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=10)
    used = []
    for _ in range(11):
        used.append(opt.param_groups[0]["lr"])  # the lr this update runs with
        opt.step()
        sched.step()
    assert used[0] == 0.0 and used[1] == pytest.approx(0.05) and used[2] == pytest.approx(0.1)
    assert used[10] == pytest.approx(0.01)
    # The schedule's settings are plain numbers in the state dict (a closure would be dropped).
    [saved] = sched.state_dict()["lr_lambdas"]
    assert saved == {"warmup_steps": 2, "max_steps": 10, "end_ratio": pytest.approx(0.1)}


def test_resolve_warmup_steps_variants():
    assert resolve_warmup_steps(TrainConfig(max_steps=100), 100) == 0
    assert resolve_warmup_steps(TrainConfig(max_steps=100, warmup_steps=500), 100) == 100
    assert resolve_warmup_steps(TrainConfig(epochs=1, warmup_fraction=0.05), 1000) == 50
