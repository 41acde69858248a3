"""Learning-rate schedules, selected by ``TrainConfig.schedule`` and run by ``LambdaLR``.

Every schedule is a picklable callable object rather than a closure so that ``LambdaLR.state_dict()`` can
record its settings as plain numbers (a closure would be dropped from the state dict silently), and an
exactly resumed run rebuilds the same curve.

Convention (the one ``torch.optim.lr_scheduler.LambdaLR`` uses): the optimizer update number ``k``
(0-based) runs with ``lr * factor(k)``, and ``scheduler.step()`` is called after each update.

Built-in schedules (:func:`list_schedules`):

* ``linear`` (default, :class:`WarmupLinearDecay`): linear warm-up from 0 to ``lr``, then linear decay to
  ``end_lr``. With ``warmup_steps=W`` the first update uses lr 0, update ``W`` is the first at the full lr,
  and the lr reaches ``end_lr`` at ``factor(max_steps)`` and stays there.
* ``speechclip`` (:class:`SpeechClipWarmupDecay`): SpeechCLIP's ``linear_warmup_decay``, the same curve one
  step earlier: the first update runs at ``lr / W``, not 0, and ``end_lr`` is reached at ``max_steps - 1``.
* ``bert_warmup_linear`` (:class:`BertWarmupLinear`): the ``warmup_linear`` schedule of the FaST-VGS and
  VG-HuBERT trainers (their ``BertAdam``), with ``warmup_fraction`` used as an exact fraction of the run
  rather than rounded to steps; it ignores ``end_lr`` (the reference decays to 0).

Register another with :func:`register_schedule`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from vgskit.errors import ConfigError
from vgskit.train.config import TrainConfig

#: ``(cfg, total_steps) -> factor(step)``; the factor object must be picklable with plain-number attributes.
ScheduleBuilder = Callable[[TrainConfig, int], Callable[[int], float]]

_SCHEDULES: dict[str, ScheduleBuilder] = {}


def register_schedule(name: str) -> Callable[[ScheduleBuilder], ScheduleBuilder]:
    """Decorator registering ``builder(cfg, total_steps) -> factor`` as the schedule ``name``."""

    def deco(builder: ScheduleBuilder) -> ScheduleBuilder:
        if name in _SCHEDULES:
            raise ValueError(f"schedule {name!r} is already registered")
        _SCHEDULES[name] = builder
        return builder

    return deco


def list_schedules() -> list[str]:
    """Names accepted by ``TrainConfig.schedule``, sorted."""
    return sorted(_SCHEDULES)


# ----------------------------------------------------------------------------------------------- schedules


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


class SpeechClipWarmupDecay:
    """SpeechCLIP's ``linear_warmup_decay`` multiplier for ``LambdaLR`` (picklable).

    ``factor(step) = (step + 1) / warmup`` during warm-up, then linear to ``final_lr / lr`` at
    ``max_step - 1``. The first update therefore runs at ``lr / warmup``, not 0: it equals
    :class:`WarmupLinearDecay` shifted by one step. ``hold_final=False`` keeps the reference's unbounded
    decay (negative learning rates a few steps past ``max_step``).
    """

    def __init__(self, warmup: int, max_step: int, lr: float, final_lr: float, hold_final: bool = True):
        if not 0 < warmup < max_step:
            raise ConfigError(f"warmup: must be in (0, max_step={max_step}) (got {warmup})")
        if lr <= 0 or not 0 <= final_lr <= lr:
            raise ConfigError(f"final_lr: must be in [0, lr={lr}] (got {final_lr})")
        self.warmup = int(warmup)
        self.max_step = int(max_step)
        self.final_ratio = float(final_lr) / float(lr)
        self.hold_final = hold_final

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.hold_final and step >= self.max_step - 1:
            return self.final_ratio
        # Same operation order as the reference, so the values agree to the last bit.
        return 1 - (1 - self.final_ratio) * (step + 1 - self.warmup) / (self.max_step - self.warmup)


def bert_warmup_linear(x: float, warmup: float) -> float:
    """FaST-VGS's ``warmup_linear(x, warmup)`` at progress ``x = step / total_steps``.

    ``x / warmup`` up to the peak at ``x = warmup``, then linear down to 0 at ``x = 1`` and 0 afterwards.
    The expressions and their order are the reference's, so the factors agree to the last bit.
    """
    if x < warmup:
        return x / warmup
    return max((x - 1.0) / (warmup - 1.0), 0.0)


class BertWarmupLinear:
    """:func:`bert_warmup_linear` of ``step / total_steps`` as a ``LambdaLR`` multiplier (picklable).

    The reference ``BertAdam`` reads its step counter before incrementing it, so its update ``k`` runs at
    ``lr * warmup_linear(k / t_total)``: exactly ``LambdaLR``'s convention, and the first update has lr 0.
    """

    def __init__(self, warmup: float, total_steps: int):
        if total_steps < 1:
            raise ConfigError(f"max_steps: must be >= 1 (got {total_steps})")
        if not 0 <= warmup < 1:
            raise ConfigError(f"warmup_fraction: must be in [0, 1) (got {warmup})")
        self.warmup = float(warmup)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        return bert_warmup_linear(step / self.total_steps, self.warmup)


class WarmupStepDecay:
    """Linear warm-up, then the lr times ``gamma`` every ``every`` steps (a staircase; picklable).

    MILAN (Sanabria et al., 2021, §4): "the learning rate [is] multiplied by 0.999 every 1,000 steps". Step
    ``s`` after a warm-up of ``w`` steps runs at ``gamma ** ((s - w) // every)`` of the peak.
    """

    def __init__(self, warmup: int, gamma: float, every: int):
        if not 0 < gamma <= 1 or every < 1 or warmup < 0:
            raise ConfigError(f"step decay: need 0 < gamma <= 1, every >= 1, warmup >= 0 (got {gamma}, {every}, "
                              f"{warmup})")
        self.warmup, self.gamma, self.every = int(warmup), float(gamma), int(every)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return self.gamma ** ((step - self.warmup) // self.every)


# ------------------------------------------------------------------------------------------------- builders


def resolve_warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Warm-up length in steps from ``warmup_steps`` or ``warmup_fraction`` (rounded) of ``total_steps``."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    if cfg.warmup_fraction is not None:
        return int(round(cfg.warmup_fraction * total_steps))
    return 0


@register_schedule("linear")
def _linear(cfg: TrainConfig, total_steps: int) -> WarmupLinearDecay:
    return WarmupLinearDecay(resolve_warmup_steps(cfg, total_steps), total_steps, cfg.lr, cfg.end_lr)


@register_schedule("speechclip")
def _speechclip(cfg: TrainConfig, total_steps: int) -> SpeechClipWarmupDecay:
    warmup = resolve_warmup_steps(cfg, total_steps)
    if not 0 < warmup < total_steps:
        # The reference divides by the warm-up length and by the decay length: both must be >= 1 step.
        key = "warmup_fraction" if cfg.warmup_fraction is not None else "warmup_steps"
        raise ConfigError(f"{key}: the 'speechclip' schedule needs a warm-up of 1 to {total_steps - 1} steps "
                          f"(the run has {total_steps}), got {warmup}")
    return SpeechClipWarmupDecay(warmup, total_steps, cfg.lr, cfg.end_lr)


@register_schedule("bert_warmup_linear")
def _bert_warmup_linear(cfg: TrainConfig, total_steps: int) -> BertWarmupLinear:
    if cfg.warmup_fraction is None:
        raise ConfigError("warmup_fraction: the 'bert_warmup_linear' schedule needs warmup_fraction "
                          "(a fraction of the run, as the reference's --warmup_fraction); warmup_steps is not used")
    return BertWarmupLinear(cfg.warmup_fraction, total_steps)


@register_schedule("step_decay")
def _step_decay(cfg: TrainConfig, total_steps: int) -> WarmupStepDecay:
    return WarmupStepDecay(resolve_warmup_steps(cfg, total_steps), cfg.decay_gamma, cfg.decay_every)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """``LambdaLR`` running the schedule ``cfg.schedule`` over ``total_steps`` optimizer updates.

    Every parameter group gets the same factor, applied to its own initial lr (``cfg.lr`` times the
    group's ``lr_scale``, see :func:`vgskit.train.optim.create_optimizer`).
    """
    try:
        builder = _SCHEDULES[cfg.schedule]
    except KeyError:
        raise ConfigError(f"schedule: unknown schedule {cfg.schedule!r}; must be one of "
                          f"{', '.join(map(repr, list_schedules()))}") from None
    return LambdaLR(optimizer, lr_lambda=builder(cfg, total_steps))


__all__ = [
    "BertWarmupLinear",
    "SpeechClipWarmupDecay",
    "WarmupLinearDecay",
    "WarmupStepDecay",
    "bert_warmup_linear",
    "build_scheduler",
    "list_schedules",
    "register_schedule",
    "resolve_warmup_steps",
]
