"""Gradient caching (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021).

A contrastive loss over a batch of ``B`` pairs needs all ``B`` embeddings at once, but the towers' activations
need not be alive together. For a model whose step is "embed every row, then a loss over the embeddings"
(:attr:`~vgskit.models.base.RetrievalModel.supports_grad_cache`: ``embed_for_loss`` + ``loss_from_embeddings``),
:func:`grad_cache_step` computes the parameter gradients of the full-batch loss with the activation memory of one
chunk of ``chunk`` rows:

1. **pass 1** embeds every chunk under ``no_grad`` (the activations are dropped at once), recording the RNG
   state before each chunk;
2. the loss runs on the concatenated embeddings, made leaves that require grad, and its backward gives
   ``dL/d embedding`` for every row (and the gradients of parameters the loss itself reads, e.g. a learnable
   temperature);
3. **pass 2** re-embeds each chunk with grad, from the RNG state recorded in pass 1 (dropout masks and any
   random augmentation inside the model replay exactly), and back-propagates the cached embedding gradients
   through it: ``torch.autograd.backward(embeddings, cached_grads)``.

By the chain rule the accumulated parameter gradients are those of one backward through the chunked forward
(what ``step`` would give if the model embedded the batch chunk by chunk); with no dropout and no BatchNorm in
training mode they equal the plain large-batch step's up to float reduction order (tested). The logged losses
and metrics are the loss's of step 2, i.e. the same as the plain step's.

BatchNorm. In training mode a BatchNorm layer normalises each chunk with that chunk's statistics, as per-process
BatchNorm does under multi-process training (``train.batchnorm: batch``): a grad-cached step is then not exactly
the large-batch step. With ``train.batchnorm: frozen`` (running statistics, BatchNorm layers in eval mode) it is
exact. Running statistics are updated once per chunk, by pass 2 only: they are saved before pass 1 and put back
after it.

Several processes. Every process runs both passes on its own slice of the global batch; a loss that gathers the
embeddings of every process (:func:`vgskit.train.distributed.all_gather_with_grad`, as
:class:`~vgskit.losses.InfoNCELoss`) does so on the cached embeddings in step 2, so each process receives
``W · dL/d(own embeddings)``. The trainer then averages the parameter gradients over processes
(:func:`average_gradients`, in place of DistributedDataParallel, whose one-backward-per-forward bookkeeping does
not fit two passes), which gives exactly the single-process gradient, as DDP does for the plain step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vgskit.contract import Batch, StepOutput, TrainState
from vgskit.errors import ConfigError

AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


def _rng_state() -> tuple[Tensor, list[Tensor]]:
    """The global CPU RNG state and, when CUDA is in use, every device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _batchnorm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Put the running statistics of BatchNorm layers in training mode back as they were on leaving the block."""
    saved = [(m, {name: buf.clone() for name, buf in m.named_buffers(recurse=False) if buf is not None})
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


def chunk_rows(n: int, chunk: int) -> list[slice]:
    """``[0, chunk), [chunk, 2·chunk), ...`` covering ``n`` rows (the last one may be shorter)."""
    if chunk < 1:
        raise ConfigError(f"train.grad_cache_chunk: must be >= 1, got {chunk}")
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _check_embeddings(embeddings: Mapping[str, Tensor], rows: int, model: nn.Module) -> None:
    if not embeddings:
        raise ConfigError(f"{type(model).__name__}.embed_for_loss returned no embeddings")
    for name, value in embeddings.items():
        if not isinstance(value, Tensor) or value.dim() < 1 or value.shape[0] != rows:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(f"{type(model).__name__}.embed_for_loss: {name!r} must be a tensor with one row per "
                              f"batch row ({rows}), got {shape}")


def grad_cache_step(
    model: Any,
    batch: Batch,
    state: TrainState,
    chunk: int,
    *,
    autocast: AutocastFactory = contextlib.nullcontext,
    scale_loss: Callable[[Tensor], Tensor] | None = None,
    check_loss: Callable[[StepOutput], None] | None = None,
) -> StepOutput:
    """Accumulate into ``.grad`` the gradients of ``model``'s loss on ``batch``, embedding ``chunk`` rows at a time.

    Args:
        model: a :class:`~vgskit.models.base.RetrievalModel` whose :attr:`supports_grad_cache` is True, in the
            mode it trains in.
        batch: the (per-process) batch.
        state: where training stands (passed to ``loss_from_embeddings``).
        chunk: rows embedded at once.
        autocast: a context factory wrapped around every model call (the trainer's AMP autocast).
        scale_loss: applied to the loss before its backward (a GradScaler's ``scale``); the cached embedding
            gradients are then scaled likewise, so the parameter gradients are those of the scaled loss.
        check_loss: called with the step's output before any backward (the trainer's non-finite check); may raise.

    Returns:
        The step's output (losses and metrics of the whole batch, as ``model.step`` would return them).
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"gradient caching needs a vgskit.contract.Batch, got {type(batch).__name__}")
    slices = chunk_rows(len(batch), chunk)
    if len(slices) == 1:
        # One chunk: the cache would only run the forward twice; this is the plain step.
        with torch.enable_grad():
            with autocast():
                out = model.loss_from_embeddings(model.embed_for_loss(batch), batch, state)
            if check_loss is not None:
                check_loss(out)
            (scale_loss(out.loss) if scale_loss is not None else out.loss).backward()
        return _detached(out)
    chunks = [batch.select(torch.arange(s.start, s.stop)) for s in slices]

    # Pass 1: embeddings only, no activations kept. BatchNorm statistics are restored afterwards so that the
    # replay in pass 2 is the one update of the step.
    rng_before: list[tuple[Tensor, list[Tensor]]] = []
    parts: list[Mapping[str, Tensor]] = []
    with torch.no_grad(), _batchnorm_statistics_kept(model):
        for part in chunks:
            rng_before.append(_rng_state())
            with autocast():
                emb = model.embed_for_loss(part)
            _check_embeddings(emb, len(part), model)
            parts.append(emb)
    rng_after = _rng_state()
    names = list(parts[0])
    if any(list(p) != names for p in parts):
        raise ConfigError(f"{type(model).__name__}.embed_for_loss returned different names for different chunks")
    # Leaves over the whole batch: [B, ...] per name.
    cached = {k: torch.cat([p[k] for p in parts]).detach().requires_grad_(p0.is_floating_point())
              for k, p0 in parts[0].items()}
    del parts

    with torch.enable_grad():
        with autocast():
            out = model.loss_from_embeddings(cached, batch, state)
        if not isinstance(out, StepOutput):
            raise TypeError(f"{type(model).__name__}.loss_from_embeddings must return a vgskit.contract.StepOutput, "
                            f"got {type(out).__name__}")
        if check_loss is not None:
            check_loss(out)
        loss = out.loss
        (scale_loss(loss) if scale_loss is not None else loss).backward()
    grads = {k: v.grad for k, v in cached.items() if v.grad is not None}  # [B, ...] each

    # Pass 2: the same chunks, the same random draws, now with grad; the cached gradients flow into the towers.
    if grads:
        try:
            for part, where, rng in zip(chunks, slices, rng_before, strict=True):
                _set_rng_state(rng)
                with autocast():
                    emb = model.embed_for_loss(part)
                pairs = [(emb[k], g[where]) for k, g in grads.items() if emb[k].requires_grad]
                if pairs:
                    torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])
        finally:
            # Later draws continue from where the chunked forward left the generator, whatever pass 2 did.
            _set_rng_state(rng_after)
    return _detached(out)


def _detached(out: StepOutput) -> StepOutput:
    return StepOutput(losses={k: v.detach() for k, v in out.losses.items()},
                      metrics={k: (v.detach() if isinstance(v, Tensor) else v) for k, v in out.metrics.items()})


def average_gradients(model: nn.Module) -> None:
    """Average the parameters' ``.grad`` over the processes of the run (DDP's reduction, done by hand).

    A parameter with a gradient on some process and none on another counts zeros there; one with no gradient
    anywhere keeps ``None`` (as DistributedDataParallel leaves a parameter that no process used). No-op in a
    single process.
    """
    from vgskit.train import distributed as D

    if not D.is_dist():
        return
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    with D._collective("averaging gradients over processes"):
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = D.get_world_size()
    # One flat buffer per dtype: a few large all-reduces instead of one per parameter.
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in used:
        by_dtype.setdefault(p.grad.dtype, []).append(p)  # type: ignore[union-attr]
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])  # type: ignore[union-attr]
        with D._collective("averaging gradients over processes"):
            dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in group:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))  # type: ignore[union-attr]
            offset += n


def broadcast_module_state(model: nn.Module, parameters: bool = True) -> None:
    """Copy rank 0's parameters (if ``parameters``) and buffers to every process (what DDP does on wrapping and,
    for buffers, before every forward). No-op in a single process."""
    from vgskit.train import distributed as D

    if not D.is_dist():
        return
    import torch.distributed as dist

    tensors = [p.data for p in model.parameters()] if parameters else []
    tensors += [b for b in model.buffers()]
    with D._collective("broadcasting the model state"), torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


__all__ = ["average_gradients", "broadcast_module_state", "chunk_rows", "grad_cache_step"]
