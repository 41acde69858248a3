"""Optimizer registry, parameter groups (weight decay, lr_scale) and the update formulas of the built-ins."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vgskit.errors import ConfigError
from vgskit.train import optim as O
from vgskit.train.config import TrainConfig
from vgskit.train.optim import (
    BertAdam,
    create_optimizer,
    default_param_groups,
    list_optimizers,
    register_optimizer,
)
from vgskit.train.schedules import build_scheduler


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"adam", "adamw", "bertadam"} <= set(list_optimizers())
    assert list_optimizers() == sorted(list_optimizers())
    with pytest.raises(ConfigError, match=r"^optimizer: must be one of 'adam', 'adamw', 'bertadam' \(got 'sgd'\)"):
        TrainConfig(optimizer="sgd", max_steps=1)
    cfg = TrainConfig(max_steps=1)
    cfg.optimizer = "sgd"  # a name that bypassed the config's own check
    with pytest.raises(ConfigError, match=r"^optimizer: unknown optimizer 'sgd'; must be one of 'adam', 'adamw'"):
        create_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], cfg)


def test_register_a_new_optimizer():
    @register_optimizer("test_sgd")
    def _sgd(groups, cfg):
        return torch.optim.SGD(groups, lr=cfg.lr)

    try:
        assert "test_sgd" in list_optimizers()
        cfg = TrainConfig(optimizer="test_sgd", lr=0.5, max_steps=1)  # the config accepts registered names
        p = nn.Parameter(torch.ones(2))
        opt = create_optimizer([{"params": [p]}], cfg)
        assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.5
        with pytest.raises(ValueError, match="already registered"):
            register_optimizer("test_sgd")(_sgd)
    finally:
        O._OPTIMIZERS.pop("test_sgd", None)


def test_default_param_groups_decay_only_matrices():
    model = _Toy()
    groups = default_param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert decay == {id(model.linear.weight)}
    assert no_decay == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias),
                        id(model.temperature)}  # frozen parameters are in neither group
    only_vectors = nn.LayerNorm(4)
    assert [g["weight_decay"] for g in default_param_groups(only_vectors, 0.1)] == [0.0]
    assert default_param_groups(nn.Linear(2, 2).requires_grad_(False), 0.1) == []


def test_groups_get_lr_scale_and_default_weight_decay():
    cfg = TrainConfig(lr=0.01, weight_decay=0.3, max_steps=10, warmup_steps=2)
    a, b, c = (nn.Parameter(torch.ones(2, 2)) for _ in range(3))
    given = [{"params": [a], "lr_scale": 0.1}, {"params": [b], "weight_decay": 0.0}, {"params": iter([c])}]
    opt = create_optimizer(given, cfg)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([0.001, 0.01, 0.01])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0, 0.3]
    assert opt.param_groups[0]["lr_scale"] == 0.1  # kept, so it shows in the state dict
    assert opt.state_dict()["param_groups"][0]["lr_scale"] == 0.1
    assert given[0] == {"params": [a], "lr_scale": 0.1}  # the caller's dicts are untouched

    # The schedule multiplies each group's own lr: the scaled group follows the same curve at a tenth.
    sched = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
        first, second, _ = (g["lr"] for g in opt.param_groups)
        assert first == pytest.approx(0.1 * second, rel=1e-12, abs=1e-15)
    assert second > 0


def test_bad_groups_and_no_parameters():
    cfg = TrainConfig(max_steps=1)
    p = nn.Parameter(torch.zeros(1))
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.lr_scale: must be a finite number >= 0"):
        create_optimizer([{"params": [p], "lr_scale": -1}], cfg)
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.lr_scale"):
        create_optimizer([{"params": [p], "lr_scale": math.nan}], cfg)
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.weight_decay"):
        create_optimizer([{"params": [p], "weight_decay": -0.1}], cfg)
    with pytest.raises(ConfigError, match=r"param_groups\[0\]: give 'lr_scale'"):
        create_optimizer([{"params": [p], "lr": 1.0}], cfg)
    with pytest.raises(ConfigError, match=r"param_groups\[0\]: missing 'params'"):
        create_optimizer([{"weight_decay": 0.0}], cfg)
    with pytest.raises(ConfigError, match="^model: has no trainable parameters$"):
        create_optimizer([], cfg)
    with pytest.raises(ConfigError, match="^model: has no trainable parameters$"):
        create_optimizer(default_param_groups(nn.Linear(2, 2).requires_grad_(False), 0.1), cfg)
    with pytest.raises(ConfigError, match="^model: has no trainable parameters$"):
        create_optimizer([{"params": []}], cfg)


# ------------------------------------------------------------------------------------- update formulas


def _expected(kind: str, p: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float,
              betas: tuple[float, float], eps: float) -> torch.Tensor:
    """The textbook update of each optimizer, in float64."""
    b1, b2 = betas
    p = p.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if kind == "adam":
            g = g + wd * p  # L2: the decay goes through the moments
        elif kind == "adamw":
            p = p * (1 - lr * wd)  # decoupled: shrink the weights, then the Adam step
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if kind == "bertadam":  # no bias correction; the decay is part of the update, scaled by lr
            p = p - lr * (m / (v.sqrt() + eps) + wd * p)
        else:
            p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return p


@pytest.mark.parametrize("kind", ["adam", "adamw", "bertadam"])
def test_update_formulas(kind):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, dtype=torch.float64, generator=gen)
    grads = [torch.randn(5, dtype=torch.float64, generator=gen) for _ in range(4)]
    cfg = TrainConfig(optimizer=kind, lr=0.05, weight_decay=0.5, betas=(0.8, 0.95), eps=1e-6, max_steps=4)
    p = nn.Parameter(p0.clone())
    opt = create_optimizer([{"params": [p]}], cfg)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want = _expected(kind, p0, grads, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


def test_adam_and_adamw_decay_differently():
    """With a zero gradient only the decay acts: AdamW shrinks by (1 - lr*wd); Adam takes a ~lr-sized step."""
    lr, wd = 0.01, 0.1
    results = {}
    for kind in ("adam", "adamw"):
        p = nn.Parameter(torch.tensor([2.0, -4.0], dtype=torch.float64))
        opt = create_optimizer([{"params": [p]}], TrainConfig(optimizer=kind, lr=lr, weight_decay=wd, max_steps=1))
        p.grad = torch.zeros_like(p)
        opt.step()
        results[kind] = p.detach()
    torch.testing.assert_close(results["adamw"], torch.tensor([2.0, -4.0], dtype=torch.float64) * (1 - lr * wd))
    # Adam normalises the L2 gradient wd*p by its own magnitude: a step of ~lr towards 0, whatever wd is.
    torch.testing.assert_close(results["adam"], torch.tensor([2.0 - lr, -4.0 + lr], dtype=torch.float64),
                               rtol=0, atol=1e-8)


def test_bertadam_skips_parameters_without_grad_and_checks_arguments():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = BertAdam([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    assert opt.state[a]["step"] == 1
    with pytest.raises(ConfigError, match="betas"):
        BertAdam([a], betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="weight_decay"):
        BertAdam([a], weight_decay=-1.0)
    loss = opt.step(lambda: torch.tensor(3.0))
    assert float(loss) == 3.0
