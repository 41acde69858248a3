"""Learning-rate schedule: linear warm-up from 0 to ``lr``, then linear decay to ``end_lr``.

The schedule is a picklable callable object rather than a closure so that ``LambdaLR.state_dict()`` can
record its settings as plain numbers (a closure would be dropped from the state dict silently).

Convention (the one ``torch.optim.lr_scheduler.LambdaLR`` uses): the optimizer update number ``k``
(0-based) runs with ``lr * factor(k)``, and ``scheduler.step()`` is called after each update. So with
``warmup_steps=W`` the first update uses lr 0, update ``W`` is the first at the full lr, and the lr reaches
``end_lr`` at ``factor(max_steps)`` and stays there.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from vgskit.errors import ConfigError
from vgskit.train.config import TrainConfig


class WarmupLinearDecay:
    """Multiplier of the base lr at a given step, for ``LambdaLR``.

    ``factor(0) = 0`` (if there is warm-up), ``factor(warmup_steps) = 1``,
    ``factor(max_steps) = end_lr / lr``, constant after ``max_steps``.
    """

    def __init__(self, warmup_steps: int, max_steps: int, lr: float, end_lr: float = 0.0):
        if max_steps < 1:
            raise ConfigError(f"max_steps: must be >= 1 (got {max_steps})")
        if not 0 <= warmup_steps <= max_steps:
            raise ConfigError(f"warmup_steps: must be in [0, max_steps={max_steps}] (got {warmup_steps})")
        if lr <= 0 or not 0 <= end_lr <= lr:
            raise ConfigError(f"end_lr: must be in [0, lr={lr}] (got {end_lr})")
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.end_ratio = float(end_lr) / float(lr)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if step >= self.max_steps:
            return self.end_ratio
        # Here warmup_steps <= step < max_steps, so the decay span is at least one step.
        progress = (step - self.warmup_steps) / (self.max_steps - self.warmup_steps)
        return 1.0 + (self.end_ratio - 1.0) * progress


def resolve_warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Warm-up length in steps from ``warmup_steps`` or ``warmup_fraction`` (rounded) of ``total_steps``."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    if cfg.warmup_fraction is not None:
        return int(round(cfg.warmup_fraction * total_steps))
    return 0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """``LambdaLR`` running :class:`WarmupLinearDecay` over ``total_steps`` optimizer updates."""
    fn = WarmupLinearDecay(resolve_warmup_steps(cfg, total_steps), total_steps, cfg.lr, cfg.end_lr)
    return LambdaLR(optimizer, lr_lambda=fn)


__all__ = ["WarmupLinearDecay", "build_scheduler", "resolve_warmup_steps"]
