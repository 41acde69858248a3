"""Multi-process data-parallel helpers for runs launched with ``torchrun``.

Launch (one machine, 2 processes; ``--standalone`` picks a free rendezvous port)::

    torchrun --standalone --nproc_per_node=2 your_train_script.py --recipe recipe.yaml

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and starts a process group (``nccl`` on CUDA, ``gloo`` on CPU). Without
them every helper here degrades to the single-process behaviour, so the same code runs both ways.

Data split. Every rank builds the same GLOBAL batch (same seed, same epoch) and keeps the contiguous slice
``batch[rank * B/W : (rank + 1) * B/W]`` (:func:`split_global_batch`). Two processes therefore see exactly
the examples one process sees, in the same order once their slices are gathered back.

Contrastive losses and gradient scale. :func:`all_gather_with_grad` concatenates a tensor over ranks with
the semantics of ``torch.distributed.nn.functional.all_gather``: its backward *sums* the incoming gradients
of every rank's copy and hands each rank the part of the sum that belongs to its own slice. If every rank computes the same
global loss ``L`` on the gathered features, each rank's local slice therefore receives ``W * dL/df_r``, and
DistributedDataParallel's gradient *averaging* (division by ``W``) turns the parameter gradient into
``sum_r dL/dtheta via f_r`` = exactly the single-process gradient of ``L`` on the full global batch.
Loss terms computed only from a rank's own rows should be means over those rows: DDP's averaging then makes
them the mean over the global batch, as in a single process.

When a process dies. A run must end, not hang, when one of its processes is killed (out of memory, ``kill -9``,
a crashed node):

* a collective of these helpers whose peer died (its connections close) or stopped answering (no reply within
  the process group's timeout, ``VGSKIT_DIST_TIMEOUT_S`` seconds, default 1800: long enough for the main
  process to extract a feature cache while the others wait) raises :class:`PeerProcessError`, which says so and
  names the operation and this process's rank; ``vgskit`` prints it as an error and exits with status 2;
* ``torchrun`` notices a worker that exited and stops the others;
* a worker whose ``torchrun`` launcher itself was killed is sent ``SIGTERM`` by the kernel (Linux
  ``PR_SET_PDEATHSIG``, set by :func:`init_distributed`), instead of training on unsupervised.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from vgskit.errors import ConfigError, VGSKitError

T = TypeVar("T")

#: Seconds a collective waits for the other processes before failing, unless ``VGSKIT_DIST_TIMEOUT_S`` says
#: otherwise. Long, because the other ranks wait at a barrier while the main one generates a corpus or extracts
#: a feature cache; a peer that *died* is noticed at once (its connections close), whatever this value.
DEFAULT_TIMEOUT_S = 1800.0

# Words of the gloo/NCCL messages that mean "the other side is gone or silent", not a bug in the call.
_PEER_FAILURE_MARKERS = ("closed by peer", "reset by peer", "broken pipe", "timed out", "timeout", "connection",
                         "aborted", "remote worker", "socket")


class PeerProcessError(VGSKitError, RuntimeError):
    """A collective failed because another process of the run died or stopped answering.

    Raised instead of the backend's error so that every surviving process ends with one clear message (the
    cause is in the log of the process that died), rather than a traceback from deep inside the backend.
    """

# Depth of active local_only() blocks; while > 0 the gather helpers act as in a single process.
_local_only_depth = 0
# The collective timeout of the process group this process joined (for error messages).
_timeout_in_use: float | None = None


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer, got {raw!r}") from None


def env_dist_info() -> DistInfo:
    """Rank, world size and local rank from the ``torchrun`` environment (``0, 1, 0`` if not launched so)."""
    return DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def _timeout_s(default: float | None) -> float:
    """The collective timeout: ``default`` if given, else ``VGSKIT_DIST_TIMEOUT_S``, else :data:`DEFAULT_TIMEOUT_S`."""
    if default is not None:
        value = float(default)
    else:
        raw = os.environ.get("VGSKIT_DIST_TIMEOUT_S", "")
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ConfigError(f"environment variable VGSKIT_DIST_TIMEOUT_S: expected seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"distributed timeout: must be > 0 seconds, got {value}")
    return value


def _end_with_launcher() -> None:
    """Under ``torchrun`` on Linux, have the kernel send this process SIGTERM when its launcher dies.

    ``torchrun`` stops its workers when one of them fails, but nobody stops them when ``torchrun`` itself is
    killed (``kill -9``, a scheduler ending the job): they would train on unsupervised, holding the devices and
    writing into the run folder. Elsewhere this does nothing.
    """
    if not os.environ.get("TORCHELASTIC_RUN_ID") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the launcher's own shutdown is all there is
        return
    if os.getppid() == 1:  # the launcher was gone before the request took effect
        raise PeerProcessError("the torchrun launcher of this process has already exited; not joining the run")


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group described by the ``torchrun`` environment variables, if there is one.

    Idempotent: a second call returns the running group's info. ``backend`` defaults to ``nccl`` when CUDA
    is available and ``gloo`` otherwise; on CUDA the process is bound to GPU ``LOCAL_RANK``. ``timeout_s``
    bounds every collective (default: ``VGSKIT_DIST_TIMEOUT_S`` or :data:`DEFAULT_TIMEOUT_S`): a process whose
    peer stopped answering raises :class:`PeerProcessError` after that long instead of waiting forever.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    info = env_dist_info()
    if not info.distributed:
        return info
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise ConfigError(f"environment variable {var}: not set although WORLD_SIZE={info.world_size}; "
                              "launch with torchrun")
    global _timeout_in_use
    timeout = _timeout_in_use = _timeout_s(timeout_s)
    _end_with_launcher()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    with _collective("joining the process group", timeout):
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout))
    return info


def _is_peer_failure(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistBackendError", ())):
        return True
    text = str(err).lower()
    return any(marker in text for marker in _PEER_FAILURE_MARKERS)


@contextlib.contextmanager
def _collective(what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Turn a backend error that means "a peer died or went silent" into :class:`PeerProcessError`."""
    try:
        yield
    except VGSKitError:
        raise
    except RuntimeError as err:
        if not _is_peer_failure(err):
            raise
        where = (f"process rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized()
                 else f"process rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}")
        limit = timeout_s if timeout_s is not None else _timeout_in_use
        silent = f"within {limit:g} s" if limit is not None else "in time"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PeerProcessError(
            f"{where}: {what} failed because a peer process of this run died or did not answer {silent} "
            f"(backend: {first_line}); the log of the process that ended says why") from err


def cleanup() -> None:
    """Leave the process group (no-op when there is none)."""
    if is_dist():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and logs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (raises :class:`PeerProcessError` if one died or stays silent past the timeout)."""
    if is_dist():
        with _collective("a barrier"):
            dist.barrier()


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Make the gather helpers return their input unchanged inside this block.

    Used when only one rank runs the model (evaluation on the main rank): a collective there would wait
    forever for ranks that are not running it.
    """
    global _local_only_depth
    _local_only_depth += 1
    try:
        yield
    finally:
        _local_only_depth -= 1


def _gathering() -> bool:
    return is_dist() and _local_only_depth == 0


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks and keeps this rank's slice.

    Same semantics as ``torch.distributed.nn.functional.all_gather`` followed by ``torch.cat`` (deprecated
    in recent PyTorch, and it warns on every call); written out here with an ``all_reduce`` in the backward,
    which every backend (gloo, nccl) supports.
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.contiguous()
        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        with _collective("all_gather (forward)"):
            dist.all_gather(parts, t)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        with _collective("all_reduce (backward of all_gather)"):
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` over ranks along dim 0, keeping the autograd path to this rank's slice.

    Every rank must pass a tensor of the same shape. The backward sums the gradients that all ranks
    computed for the gathered tensor; see the module docstring for why, with one identical global loss per
    rank plus DDP averaging, parameter gradients then equal the single-process ones.
    """
    if not _gathering():
        return t
    return _AllGatherWithGrad.apply(t)


def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` over ranks along dim 0 without autograd (labels, ids, integer tensors)."""
    if not _gathering():
        return t
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    with _collective("all_gather"):
        dist.all_gather(out, t)
    return torch.cat(out, dim=0)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    with _collective("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (other ranks' argument is ignored)."""
    if not is_dist():
        return obj
    box: list[Any] = [obj if get_rank() == src else None]
    with _collective(f"broadcast from rank {src}"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` itself is left alone)."""
    if not is_dist():
        return t.clone()
    out = t.detach().clone()
    with _collective("all_reduce"):
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on at least one, so that all ranks take the same branch."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    with _collective("all_reduce (any rank)"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def split_global_batch(batch: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's contiguous slice ``batch[rank*B/W : (rank+1)*B/W]`` of a global batch of size ``B``."""
    n = len(batch)
    if n % world_size:
        raise ConfigError(f"batch_size: a global batch of {n} examples cannot be split evenly over "
                          f"{world_size} processes; use a multiple of the world size")
    per = n // world_size
    return list(batch[rank * per:(rank + 1) * per])


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "PeerProcessError",
    "all_gather_no_grad",
    "all_gather_object",
    "all_gather_with_grad",
    "all_reduce_mean",
    "any_rank",
    "barrier",
    "broadcast_object",
    "cleanup",
    "env_dist_info",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist",
    "is_main",
    "local_only",
    "split_global_batch",
]
