"""Inference precision: ``fp32`` (the default) or ``bf16`` autocast where the hardware has it.

bf16 autocast runs matrix products and convolutions in bfloat16 (8 significant bits, the float32 exponent
range) and keeps reductions, norms and softmax in float32. On a CPU with native bf16 instructions (AVX-512
BF16 or AMX-BF16) the transformer towers run about 2.5-3 times faster; on a CPU without them PyTorch emulates
bf16 and is *slower* than float32, so ``bf16`` is a request honoured only where it pays:

* :func:`resolve_precision` validates the name and, for ``bf16`` on a CPU without native bf16, falls back
  to ``fp32`` with one logged warning saying why (``strict=True`` raises instead);
* :func:`autocast` is the context the model forward runs in (a no-op for ``fp32``);
* callers cast what the forward returns to float32 (the evaluator's embeddings, cached features), so metrics,
  stored indices and caches see one dtype whatever the precision.

Code that cannot pass a ``precision`` argument down (e.g. a helper that calls the evaluator for several
splits) sets the default for a block with :func:`precision_scope`; the evaluator's ``precision=None`` means
"the precision of the enclosing scope", which is ``fp32`` outside any scope.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

from vgskit.errors import ConfigError

__all__ = ["PRECISIONS", "Precision", "autocast", "cpu_supports_bf16", "current_precision", "precision_scope",
           "resolve_precision", "validate_precision"]

log = logging.getLogger("vgskit.precision")

#: Every precision name accepted by the evaluator, the feature cache and the command line.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
Precision = str

#: /proc/cpuinfo flags that mean native bf16 arithmetic: x86 AVX-512 BF16 / AMX-BF16, Arm's BF16 extension.
_CPUINFO_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})

_scope: contextvars.ContextVar[str] = contextvars.ContextVar("vgskit_precision", default="fp32")
# Device types the fallback warning was already logged for: one warning per process, not one per batch.
_warned: set[str] = set()


def validate_precision(name: object) -> str:
    """``name`` if it is one of :data:`PRECISIONS`, else :class:`ConfigError` listing the choices."""
    if not isinstance(name, str) or name not in PRECISIONS:
        raise ConfigError(f"precision {name!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    return name


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags Linux lists (x86 ``flags``, Arm ``Features``); empty when unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (so bf16 autocast is faster than float32).

    Detection, first answer wins:

    1. ``torch.cpu.get_capabilities()`` (PyTorch >= 2.8; the cpuinfo library's CPUID reading, any OS):
       ``avx512_bf16`` or ``amx_bf16``. ``torch.backends.cpu.get_cpu_capability()`` is not enough: it says
       ``"AVX512"`` for AVX-512 CPUs with and without the BF16 extension.
    2. Linux ``/proc/cpuinfo`` flags: ``avx512_bf16``, ``amx_bf16`` (x86) or ``bf16`` (Arm).
    3. Otherwise False: bf16 would be emulated.

    The answer is cached for the process.
    """
    get_capabilities = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if callable(get_capabilities):
        try:
            caps = get_capabilities()
        except Exception:  # noqa: BLE001 - an unreadable CPUID must not stop an evaluation; fall through
            caps = None
        if isinstance(caps, dict) and ("avx512_bf16" in caps or "amx_bf16" in caps):
            return bool(caps.get("avx512_bf16")) or bool(caps.get("amx_bf16"))
    if platform.system() == "Linux":
        return bool(_cpuinfo_flags() & _CPUINFO_BF16_FLAGS)
    return False


def _device_type(device: str | torch.device | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


def _device_supports_bf16(device_type: str) -> tuple[bool, str]:
    """``(native bf16?, why not)`` for a device type."""
    if device_type == "cpu":
        return cpu_supports_bf16(), ("this CPU has no native bf16 instructions (neither AVX-512 BF16 nor "
                                     "AMX-BF16), so PyTorch would emulate bf16, slower than fp32")
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "this CUDA device has no bf16 support (compute capability below 8.0)"
    # Other accelerators (mps, xpu, ...): torch.autocast says itself whether it supports bf16 there.
    return True, ""


def resolve_precision(name: str | None, device: str | torch.device | None = None, *, strict: bool = False) -> str:
    """The precision to run at on ``device``: ``name`` validated, or ``fp32`` where bf16 is not native.

    Args:
        name: ``"fp32"`` or ``"bf16"``; ``None``: the enclosing :func:`precision_scope`'s (``fp32`` by default).
        device: where the model runs (default: the CPU).
        strict: raise :class:`ConfigError` instead of falling back when ``bf16`` is not native on ``device``.

    Returns:
        ``"fp32"`` or ``"bf16"``. The fallback logs one warning (per device type and process) saying why.
    """
    name = validate_precision(current_precision() if name is None else name)
    if name == "fp32":
        return name
    device_type = _device_type(device)
    native, why = _device_supports_bf16(device_type)
    if native:
        return name
    if strict:
        raise ConfigError(f"precision bf16 on {device_type}: {why}; use fp32")
    if device_type not in _warned:
        _warned.add(device_type)
        log.warning("precision bf16 requested on %s, running fp32 instead: %s", device_type, why)
    return "fp32"


def autocast(precision: str, device: str | torch.device | None = None) -> contextlib.AbstractContextManager:
    """The context a model forward runs in at ``precision``: bf16 autocast, or nothing for ``fp32``.

    ``precision`` is used as given (call :func:`resolve_precision` first to apply the fallback rule).
    Outputs under bf16 may be bfloat16 tensors: cast them to float32 before storing or scoring them.
    """
    if validate_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=torch.bfloat16)


def current_precision() -> str:
    """The precision set by the innermost :func:`precision_scope` (``fp32`` outside any)."""
    return _scope.get()


@contextlib.contextmanager
def precision_scope(precision: str) -> Iterator[str]:
    """Make ``precision`` the default of every ``precision=None`` call (evaluator, embedding) inside the block.

    For callers that cannot pass the argument down through code they do not own. The name is validated, not
    resolved: the functions inside resolve it for the device their model is on.
    """
    token = _scope.set(validate_precision(precision))
    try:
        yield precision
    finally:
        _scope.reset(token)
