"""Optimizers by name: a registry selected by ``TrainConfig.optimizer``, and the FaST-VGS ``BertAdam``.

A factory ``(param_groups, cfg) -> torch.optim.Optimizer`` is registered with :func:`register_optimizer`;
:func:`create_optimizer` normalises the parameter groups first, so factories only pass ``cfg``'s optimizer
settings through::

    groups = default_param_groups(model, cfg.weight_decay)      # or your own, e.g. a smaller lr for a tower
    groups[0]["lr_scale"] = 0.1
    optimizer = create_optimizer(groups, cfg)                    # cfg.optimizer: adam, adamw, bertadam, ...

The learning-rate schedule is never inside an optimizer: :func:`vgskit.train.schedules.build_scheduler`
wraps any of them in a ``LambdaLR`` that sets each group's ``lr`` before the update.

Built-ins (:func:`list_optimizers`):

* ``adam``: ``torch.optim.Adam``; its ``weight_decay`` is the L2 variant (``wd * p`` is added to the
  gradient, so it goes through the moment estimates).
* ``adamw``: ``torch.optim.AdamW``; decoupled decay ``p -= lr * wd * p`` next to the Adam update.
* ``bertadam``: :class:`BertAdam`, the optimizer of the FaST-VGS and VG-HuBERT trainers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vgskit.errors import ConfigError

if TYPE_CHECKING:
    from vgskit.train.config import TrainConfig

#: ``(param_groups, cfg) -> optimizer``; the groups already carry ``lr`` and ``weight_decay``.
OptimizerFactory = Callable[[list[dict[str, Any]], "TrainConfig"], torch.optim.Optimizer]

_OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator registering ``factory(param_groups, cfg) -> Optimizer`` as the optimizer ``name``."""

    def deco(factory: OptimizerFactory) -> OptimizerFactory:
        if name in _OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is already registered")
        _OPTIMIZERS[name] = factory
        return factory

    return deco


def list_optimizers() -> list[str]:
    """Names accepted by ``TrainConfig.optimizer``, sorted."""
    return sorted(_OPTIMIZERS)


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: weight decay on matrices/kernels, none on parameters with ``ndim < 2``.

    ``ndim < 2`` catches biases, LayerNorm/BatchNorm scales and scalar parameters such as a contrastive
    temperature, which weight decay would pull towards 0 for no regularisation benefit.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _number(group: dict[str, Any], key: str, i: int, minimum: float) -> float:
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"param_groups[{i}].{key}: must be a finite number >= {minimum} (got {value!r})")
    return float(value)


def create_optimizer(param_groups: Iterable[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``param_groups``, each group's lr and weight decay filled in.

    Each group is a dict with ``params`` and optionally ``weight_decay`` (default ``cfg.weight_decay``) and
    ``lr_scale``: the group's ``lr`` becomes ``cfg.lr * lr_scale``, which the schedule then multiplies, so
    e.g. a pretrained tower can follow the same curve at a tenth of the lr. ``lr_scale`` stays in the group
    so that it shows in the optimizer's state dict. The caller's dicts are not modified.

    Raises:
        ConfigError: an unknown optimizer name (the message lists the registered ones), a bad ``lr_scale``
            or ``weight_decay`` in a group, or no trainable parameters at all.
    """
    try:
        factory = _OPTIMIZERS[cfg.optimizer]
    except KeyError:
        raise ConfigError(f"optimizer: unknown optimizer {cfg.optimizer!r}; must be one of "
                          f"{', '.join(map(repr, list_optimizers()))}") from None
    groups: list[dict[str, Any]] = []
    for i, given in enumerate(param_groups):
        group = dict(given)
        if "params" not in group:
            raise ConfigError(f"param_groups[{i}]: missing 'params'")
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        if "lr" in group:
            # The lr of a group is always cfg.lr * lr_scale: a second way to set it would silently lose one.
            raise ConfigError(f"param_groups[{i}]: give 'lr_scale' (a multiple of train.lr), not 'lr'")
        group["lr"] = cfg.lr
        if "lr_scale" in group:
            group["lr"] = cfg.lr * _number(group, "lr_scale", i, 0.0)
        group["weight_decay"] = (_number(group, "weight_decay", i, 0.0) if "weight_decay" in group
                                 else cfg.weight_decay)
        groups.append(group)
    if not any(group["params"] for group in groups):
        raise ConfigError("model: has no trainable parameters")
    return factory(groups, cfg)


# ----------------------------------------------------------------------------------------------- built-ins


@register_optimizer("adam")
def _adam(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


@register_optimizer("adamw")
def _adamw(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


@register_optimizer("bertadam")
def _bertadam(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return BertAdam(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


class BertAdam(torch.optim.Optimizer):
    """Adam as the FaST-VGS / VG-HuBERT trainers use it (their ``steps/bert_adam.py``).

    Per parameter, with gradient ``g``::

        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr * (m / (sqrt(v) + eps) + weight_decay * p)

    It differs from :class:`torch.optim.AdamW` in two ways that change the trajectory: there is no bias
    correction, and the decay is scaled by the group's current lr inside the update. Without bias correction
    the early updates are *larger* than Adam's: for a steady gradient ``m / sqrt(v)`` is
    ``(1 - b1^t) / sqrt(1 - b2^t)``, i.e. 3.2 at step 1, 6.5 at step 10, 3.2 at step 100 and 1.26 at step 1,000
    (Adam: 1), which a warm-up keeps in check at the published learning rates. The reference's own lr schedule and its
    ``max_grad_norm`` are not part of this class: the schedule is an outside ``LambdaLR`` (``lr`` here is
    the already scheduled group lr; the ``bert_warmup_linear`` schedule reproduces the reference's), and the
    trainer clips gradients. The reference default ``eps`` is 1e-6.

    The state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) is in ``state_dict()``, so a resumed run
    continues exactly.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01):
        if not lr >= 0.0:
            raise ConfigError(f"lr: must be >= 0 (got {lr})")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(f"betas: must be two numbers in [0, 1) (got {betas})")
        if not eps >= 0.0:
            raise ConfigError(f"eps: must be >= 0 (got {eps})")
        if not weight_decay >= 0.0:
            raise ConfigError(f"weight_decay: must be >= 0 (got {weight_decay})")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # The reference's operations in its order, so that float32 results agree bit for bit.
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + eps)
                if weight_decay > 0.0:
                    update += weight_decay * p
                p.add_(-(lr * update))
                state["step"] += 1
        return loss


__all__ = [
    "BertAdam",
    "OptimizerFactory",
    "create_optimizer",
    "default_param_groups",
    "list_optimizers",
    "register_optimizer",
]
