"""The training engine: plain PyTorch, one class, single process or ``torchrun`` data parallel.

Contract
--------
* ``model(batch, state) -> StepOutput`` (:mod:`vgskit.contract`): named, already-weighted losses, which the
  trainer sums and back-propagates, and metrics; each loss is logged as ``loss/<name>`` beside their sum
  ``loss``. ``state`` is the :class:`~vgskit.contract.TrainState` of the step (step, epoch, fraction of the
  run). ``batch`` is what ``collate_fn`` returns for this process's slice of the global batch (a
  :class:`~vgskit.contract.Batch` for retrieval models), moved to the device. For a loss over the whole global
  batch (contrastive losses), gather features with :func:`vgskit.train.distributed.all_gather_with_grad` and
  compute the same global loss on every rank; see that module for why the gradients then equal
  single-process ones.
* A :class:`~vgskit.models.base.RetrievalModel` also supplies its optimizer parameter groups
  (``param_groups``: weight decay and lr scale per group), ``ddp_options`` and an ``after_step(state)`` hook
  that runs after every optimizer update (EMA / momentum teachers); any other ``nn.Module`` gets the
  defaults (decay on matrices only, no options, no hook).
* The optimizer is built by name from the registry of :mod:`vgskit.train.optim` (``adam``, ``adamw``,
  ``bertadam``, ...), the lr schedule by name from :mod:`vgskit.train.schedules`; ``init_from`` starts the
  run from another run's model weights.
* ``train_data`` is a map-style dataset (``__getitem__`` + ``__len__``).
* ``batch_sampler_factory(epoch, seed) -> list[list[int]]`` returns the epoch's GLOBAL batches of dataset
  indices; it must be deterministic in ``(epoch, seed)`` because every rank calls it and keeps its own
  contiguous slice. The default is :class:`RandomBatches` (seeded permutation, chunks of ``batch_size``,
  last partial batch dropped). A custom factory controls batch composition (e.g. two captions per image).
* ``evaluate_fn(model) -> dict[str, float] | None`` runs on the main rank only, on the bare (unwrapped)
  model in eval mode under ``torch.no_grad()`` and :func:`vgskit.train.distributed.local_only` (gathers
  are no-ops there); its result is broadcast to all ranks so they agree on the best checkpoint.

Example (one process, or ``torchrun --standalone --nproc_per_node=2 train_script.py``)::

    cfg = TrainConfig(lr=3e-4, batch_size=64, epochs=10, out_dir="runs/exp1", select_metric="mean_R@10")
    trainer = Trainer(model, cfg, dataset, collate_fn=collate, evaluate_fn=evaluate)
    summary = trainer.fit(resume=True)   # continues from runs/exp1/checkpoints/latest if it exists

Exact resume
------------
A checkpoint records the step, the epoch and the position in that epoch's list of global batches; the batch
list is a pure function of ``(epoch, seed)``, so a resumed run recomputes it and skips the batches already
done. Model, optimizer, LR scheduler and GradScaler states are restored, and so are the global RNG states of
every rank (dropout). With deterministic data loading (``num_workers=0``, or workers whose items do not
depend on their RNG) a resumed run ends with the same weights as an uninterrupted one. A latest checkpoint
whose files are damaged (truncated, empty) is moved aside to ``step_<N>.corrupt`` and the run resumes from the
newest complete one, with a warning naming both; a ``best/`` left behind by an interrupted update is repaired.

One writer per run folder
-------------------------
``fit`` holds an advisory lock on ``<out_dir>/.lock`` (:class:`vgskit.fileio.FolderLock`; the main rank
takes it for all ranks) from start to end, exceptions included. A second ``fit`` on the same folder, fresh or
resuming, is refused before it reads or writes anything there, with the holder's pid in the message; the
lock dies with its process, so a killed run never leaves the folder blocked.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from vgskit.contract import StepOutput, TrainState
from vgskit.errors import ConfigError, VGSKitError
from vgskit.fileio import FolderInUseError, FolderLock, check_output_folder
from vgskit.train import distributed as D
from vgskit.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    repair_best,
    restore_rng_state,
    save_checkpoint,
    update_best,
    verify_checkpoint,
)
from vgskit.train.config import TrainConfig, to_jsonable
from vgskit.train.gradcache import average_gradients, broadcast_module_state, grad_cache_step
from vgskit.train.optim import create_optimizer, default_param_groups
from vgskit.train.schedules import build_scheduler
from vgskit.train.tracking import MetricsLogger

log = logging.getLogger("vgskit.train")

BatchSamplerFactory = Callable[[int, int], Sequence[Sequence[int]]]
EvaluateFn = Callable[[nn.Module], "Mapping[str, float] | None"]

# Train-config fields that may change between a run and its resumption without changing the result.
# init_from only matters for a fresh start: a resumed run continues from its own checkpoint.
_RESUME_FREE_FIELDS = {"stop_after_steps", "time_budget_s", "out_dir", "num_workers", "log_every", "init_from",
                       "tensorboard", "ckpt_every", "keep_last"}


class TrainStepError(VGSKitError, RuntimeError):
    """A training step that failed (data loading, forward/backward, non-finite loss); names the step."""

    def __init__(self, step: int, epoch: int, position: int, problem: str):
        self.step, self.epoch, self.position = step, epoch, position
        super().__init__(f"training step {step} (epoch {epoch}, batch {position} of the epoch): {problem}")


class RandomBatches:
    """Default ``batch_sampler_factory``: a seeded permutation of ``range(n)`` cut into global batches.

    The permutation depends only on ``(seed, epoch)``, so every rank and every resumed run gets the same
    batches. The last partial batch is dropped (``drop_last``) so every step sees ``batch_size`` examples.
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool = True):
        self.n, self.batch_size, self.drop_last = int(n), int(batch_size), drop_last

    def num_batches(self, epoch: int = 0) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __call__(self, epoch: int, seed: int) -> list[list[int]]:
        perm = np.random.default_rng([int(seed), int(epoch)]).permutation(self.n).tolist()
        return [perm[i:i + self.batch_size] for i in range(0, self.num_batches(epoch) * self.batch_size,
                                                           self.batch_size)]


class _FixedBatches(Sampler[list[int]]):
    """A precomputed list of batches, for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, batches: Sequence[Sequence[int]]):
        self.batches = [list(b) for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def param_groups_for_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Alias of :func:`vgskit.train.optim.default_param_groups` (decay on matrices, none on biases/norms/scalars)."""
    return default_param_groups(model, weight_decay)


def _is_retrieval_model(model: nn.Module) -> bool:
    from vgskit.models.base import RetrievalModel

    return isinstance(model, RetrievalModel)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The registered optimizer ``cfg.optimizer`` over the model's parameter groups."""
    groups = (model.param_groups(cfg.weight_decay) if _is_retrieval_model(model)  # type: ignore[operator]
              else default_param_groups(model, cfg.weight_decay))
    return create_optimizer(groups, cfg)


def load_init_weights(model: nn.Module, source: str | Path) -> Path:
    """Load another run's model weights (``train.init_from``) into ``model``; returns the weights file used.

    ``source`` is a checkpoint folder (``best/``, ``step_N/``), a run folder (its best checkpoint) or a
    ``model.safetensors`` file. Every tensor of the model must be present with its shape: pre-training and
    fine-tuning share one architecture (MILAN's CSC pre-training, then the target corpus).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from vgskit.train.checkpoint import resolve_model_folder

    p = Path(source)
    if p.is_dir():
        # The same resolution as every --checkpoint: a run's checked best/ (or latest), a step folder, a model.
        try:
            p = resolve_model_folder(p) / "model.safetensors"
        except VGSKitError as e:
            raise ConfigError(f"train.init_from {source}: {e}") from None
    if not p.is_file():
        raise ConfigError(f"train.init_from {source}: not found")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"train.init_from {p}: unreadable weights ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = "; ".join(f"{what}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("other shape", wrong)) if keys)
        raise ConfigError(f"train.init_from {p}: the weights do not fit this model ({details})")
    model.load_state_dict(state, strict=True)
    return p


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch, numpy and python RNGs from ``(seed, rank)`` (different ranks get different streams)."""
    s = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors inside dicts/lists/tuples moved to ``device``; everything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if callable(getattr(type(batch), "to_device", None)):  # the typed batches of vgskit.contract
        return batch.to_device(device, non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device, non_blocking) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


@dataclass
class _Progress:
    """Where training stands; written to ``trainer_state.json``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    elapsed_s: float = 0.0


class Trainer:
    """Fits ``model`` on ``train_data`` according to ``cfg``; see the module docstring for the contract.

    Single process: ``python train_script.py``. Data parallel: ``torchrun --standalone --nproc_per_node=N
    train_script.py`` (the process group is started here from torchrun's environment variables).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        train_data: Dataset,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        *,
        batch_sampler_factory: BatchSamplerFactory | None = None,
        evaluate_fn: EvaluateFn | None = None,
        model_name: str | None = None,
        model_config: Any = None,
        extra_config: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        progress_bar: bool = True,
    ):
        self.cfg = cfg
        self.progress_bar = progress_bar
        self.dist = D.init_distributed()
        if device is None:
            device = f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.collate_fn = collate_fn
        self.batch_sampler_factory: BatchSamplerFactory = (
            batch_sampler_factory or RandomBatches(len(train_data), cfg.batch_size))  # type: ignore[arg-type]
        self.evaluate_fn = evaluate_fn
        self.out_dir = check_output_folder(cfg.out_dir, "out_dir")  # before any work is spent
        self.ckpt_root = self.out_dir / "checkpoints"
        # Same layout as vgskit.models.registry.save_pretrained, so any checkpoint folder (step_N/ or best/)
        # loads with load_pretrained(); the training settings ride along under "train" and "extra".
        self.run_config = {
            "model": model_name,
            "config": to_jsonable(model_config, "model"),
            "train": to_jsonable(cfg, "train"),
            "extra": to_jsonable(dict(extra_config or {}), "extra"),
        }

        self.total_steps = self._count_total_steps()
        if _is_retrieval_model(self.model) and not self.model.trainable:
            raise ConfigError(f"model {model_name or type(self.model).__name__!r} has no trainable weights "
                              "(evaluate it as built: vgskit eval --model NAME)")
        if cfg.grad_cache_chunk is not None:
            from vgskit.models.base import grad_cache_problem

            problem = grad_cache_problem(self.model)
            if problem is not None:
                raise ConfigError(f"train.grad_cache_chunk: model {model_name or type(self.model).__name__!r} cannot "
                                  f"train with a gradient cache: {problem}; set train.grad_cache_chunk: null")
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        # bf16 autocast on a CPU without native bf16 would be emulated, slower than fp32: train fp32 there
        # (one warning), as --precision bf16 does for evaluation.
        self.amp = cfg.amp
        if cfg.amp and self.device.type == "cpu":
            from vgskit.precision import resolve_precision

            self.amp = resolve_precision("bf16", self.device) == "bf16"
        # bf16 autocast needs no loss scaling; fp16 on CUDA does.
        use_scaler = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.progress = _Progress()
        self._ddp_model: nn.Module | None = None

    # ------------------------------------------------------------------------------------------- set-up

    def _count_total_steps(self) -> int:
        cfg = self.cfg
        by_epochs = None
        if cfg.epochs is not None:
            counter = getattr(self.batch_sampler_factory, "num_batches", None)
            by_epochs = sum(
                counter(e) if counter else len(self.batch_sampler_factory(e, cfg.seed)) for e in range(cfg.epochs))
            if by_epochs == 0:
                raise ConfigError(f"batch_size: {cfg.batch_size} leaves no full batch in a dataset of "
                                  f"{len(self.train_data)} examples")  # type: ignore[arg-type]
        if cfg.max_steps is not None and by_epochs is not None:
            return min(cfg.max_steps, by_epochs)
        return cfg.max_steps if cfg.max_steps is not None else int(by_epochs or 0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        batches = [list(b) for b in self.batch_sampler_factory(epoch, self.cfg.seed)]
        if not batches:
            raise ConfigError(f"batch_size: epoch {epoch} has no batches (dataset of "
                              f"{len(self.train_data)} examples)")  # type: ignore[arg-type]
        for i, b in enumerate(batches):
            if not b or len(b) % self.dist.world_size:
                raise ConfigError(f"batch_size: global batch {i} of epoch {epoch} has {len(b)} examples, "
                                  f"not a positive multiple of the {self.dist.world_size} processes")
        return batches

    def _loader(self, local_batches: list[list[int]], epoch: int, position: int) -> DataLoader:
        # A private generator keeps the DataLoader from drawing on the global torch RNG (which would shift
        # dropout masks between a resumed and an uninterrupted run) and fixes the worker seeds.
        gen = torch.Generator()
        gen.manual_seed(int(np.random.SeedSequence([self.cfg.seed, epoch, position, self.dist.rank])
                            .generate_state(1)[0]))
        return DataLoader(
            self.train_data,
            batch_sampler=_FixedBatches(local_batches),
            collate_fn=self.collate_fn,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=gen,
        )

    def _resume(self, resume: bool | str) -> int | None:
        """Load the checkpoint to continue from; returns its step, or None for a fresh start."""
        if resume is False:
            if list_checkpoints(self.ckpt_root):
                raise ConfigError(f"out_dir: {self.out_dir} already holds checkpoints; pass resume=True to "
                                  "continue that run or choose another out_dir")
            return None
        if resume is True:
            found = latest_checkpoint(self.ckpt_root)
            if found is None:
                if D.is_main():
                    log.info("no checkpoint under %s; starting from scratch", self.ckpt_root)
                return None
            path: Path = self._complete_checkpoint(found)
        else:
            path = Path(resume)
        loaded = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 scaler=self.scaler, device=self.device)
        st = loaded.trainer_state
        self.progress = _Progress(
            step=int(st["step"]), epoch=int(st["epoch"]), batch_in_epoch=int(st["batch_in_epoch"]),
            samples_seen=int(st.get("samples_seen", 0)), best_metric=st.get("best_metric"),
            best_step=st.get("best_step"), elapsed_s=float(st.get("elapsed_s", 0.0)))
        if len(loaded.rng_states) == self.dist.world_size:
            restore_rng_state(loaded.rng_states[self.dist.rank])
        else:
            # Another world size: per-rank streams cannot be matched, so derive fresh ones from the step.
            seed_everything(self.cfg.seed + self.progress.step, self.dist.rank)
            if D.is_main():
                log.warning("checkpoint has RNG states of %d processes, this run has %d; RNG reseeded",
                            len(loaded.rng_states), self.dist.world_size)
        old = loaded.config.get("train", {})
        changed = sorted(k for k, v in self.run_config["train"].items()
                         if k in old and old[k] != v and k not in _RESUME_FREE_FIELDS)
        if changed and D.is_main():
            log.warning("resuming with changed train settings %s; the result will differ from an "
                        "uninterrupted run", ", ".join(f"{k}: {old[k]!r} -> {self.run_config['train'][k]!r}"
                                                       for k in changed))
        if D.is_main():
            log.info("resumed from %s at step %d (epoch %d, batch %d)", loaded.path, self.progress.step,
                     self.progress.epoch, self.progress.batch_in_epoch)
            repaired = repair_best(self.ckpt_root)
            if repaired:
                log.warning("%s", repaired)
        return self.progress.step

    def _complete_checkpoint(self, newest: Path) -> Path:
        """``newest``, or the newest older checkpoint whose files all read back when ``newest``'s do not.

        The main rank checks and decides (and moves each damaged folder aside to ``step_<N>.corrupt`` so that
        pruning and later resumes no longer count it); every rank then loads the folder it chose. Refuses
        when no checkpoint is complete rather than silently starting over.
        """
        choice: str | None = None
        problems: list[str] = []
        if D.is_main():
            newest_step = int(newest.name.split("_")[-1]) if newest.name.startswith("step_") else None
            older = [p for s, p in reversed(list_checkpoints(self.ckpt_root))
                     if p != newest and (newest_step is None or s < newest_step)]
            bad: list[tuple[Path, str]] = []
            for candidate in [newest, *older]:
                try:
                    verify_checkpoint(candidate)
                except CheckpointError as e:
                    bad.append((candidate, e.problem))
                    continue
                choice = str(candidate)
                break
            if choice is not None:
                for folder, problem in bad:
                    aside = folder.with_name(f"{folder.name}.corrupt")
                    if aside.exists():
                        aside = folder.with_name(f"{folder.name}.corrupt-{os.getpid()}")
                    try:
                        folder.rename(aside)
                        moved = f"moved it to {aside.name}"
                    except OSError as e:  # a read-only folder: resuming still works, pruning may count it
                        moved = f"could not move it aside ({e})"
                    log.warning("checkpoint %s is unusable (%s); %s and resuming from %s, the newest complete "
                                "checkpoint", folder, problem, moved, Path(choice).name)
            problems = [f"{folder.name}: {problem}" for folder, problem in bad]
        choice, problems = D.broadcast_object((choice, problems))
        if choice is None:
            raise CheckpointError(self.ckpt_root, "no complete checkpoint to resume from (" + "; ".join(problems)
                                  + "); remove the folder to start over")
        return Path(choice)

    # ------------------------------------------------------------------------------------------ pieces

    def _trainer_state(self) -> dict[str, Any]:
        p = self.progress
        return {
            "step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch,
            "samples_seen": p.samples_seen, "best_metric": p.best_metric, "best_step": p.best_step,
            "select_metric": self.cfg.select_metric, "select_mode": self.cfg.select_mode,
            "seed": self.cfg.seed, "world_size": self.dist.world_size, "total_steps": self.total_steps,
            "elapsed_s": p.elapsed_s,
        }

    def _save(self, best: bool) -> Path | None:
        """Checkpoint on the main rank (all ranks must call: RNG states are gathered from each)."""
        rng_states = D.all_gather_object(capture_rng_state())
        path = None
        if D.is_main():
            path = save_checkpoint(
                self.ckpt_root, self.progress.step, model=self.model, trainer_state=self._trainer_state(),
                config=self.run_config, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, rng_states=rng_states, keep_last=self.cfg.keep_last)
            if best:
                update_best(self.ckpt_root, path)
        D.barrier()
        return path

    def _evaluate(self) -> dict[str, float] | None:
        metrics = None
        if D.is_main() and self.evaluate_fn is not None:
            self.model.eval()
            try:
                # local_only: the other ranks are not evaluating, so a gather inside the model would hang.
                with torch.no_grad(), D.local_only():
                    raw = self.evaluate_fn(self.model)
            finally:
                self._train_mode()
            if raw is not None:
                try:
                    metrics = {str(k): float(v) for k, v in raw.items()}
                except (TypeError, ValueError, AttributeError) as e:
                    raise ConfigError(f"evaluate_fn: must return a dict of numbers, got {raw!r}") from e
        return D.broadcast_object(metrics)

    def _is_improvement(self, metrics: Mapping[str, float] | None) -> bool:
        name = self.cfg.select_metric
        if name is None or metrics is None:
            return False
        if name not in metrics:
            raise ConfigError(f"select_metric: {name!r} is not among the evaluation metrics "
                              f"{sorted(metrics)}")
        value = metrics[name]
        if math.isnan(value):
            return False
        best = self.progress.best_metric
        better = best is None or (value > best if self.cfg.select_mode == "max" else value < best)
        if better:
            self.progress.best_metric, self.progress.best_step = value, self.progress.step
        return better

    def _batchnorms(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _train_mode(self) -> None:
        """Training mode, with BatchNorm layers in eval mode when ``batchnorm: frozen``."""
        self.model.train()
        if self.cfg.batchnorm == "frozen":
            for m in self._batchnorms():
                m.eval()

    def _prepare_batchnorm(self) -> None:
        """Under DDP: SyncBatchNorm for ``sync``; a warning that ``batch`` statistics are per process."""
        norms = [m for m in self._batchnorms() if m.training or self.cfg.batchnorm == "sync"]
        if not norms:
            return
        if self.cfg.batchnorm == "sync":
            if self.device.type != "cuda":
                raise ConfigError("train.batchnorm: 'sync' needs CUDA (SyncBatchNorm has no CPU kernel); use "
                                  "'frozen' for exact multi-process training on CPU")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif self.cfg.batchnorm == "batch" and D.is_main():
            log.warning("the model has %d BatchNorm layers normalising with each process's slice of the batch: "
                        "%d processes do not train exactly what 1 process trains (train.batchnorm: frozen or "
                        "sync makes them equal)", len(norms), self.dist.world_size)

    def _state(self, step: int, epoch_float: float) -> TrainState:
        return TrainState(step=step, epoch=int(epoch_float), epoch_float=epoch_float, total_steps=self.total_steps)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _check_finite(self, out: StepOutput) -> None:
        # Agreed across ranks, so that no rank stops while the others wait in a collective.
        if D.any_rank(not bool(torch.isfinite(out.loss.detach()).item()), self.device):
            bad = ", ".join(f"{k}={v.item():.4g}" for k, v in out.losses.items())
            raise FloatingPointError(f"loss is not finite ({bad}) on at least one process")

    def _grad_cached_backward(self, batch: Any, state: TrainState) -> StepOutput:
        """Forward and backward of one step through the gradient cache (``train.grad_cache_chunk``).

        Leaves in ``.grad`` what the plain step's backward leaves there (see :mod:`vgskit.train.gradcache`),
        averaged over processes under ``torchrun``; returns the step's (detached) output for logging.
        """
        assert self.cfg.grad_cache_chunk is not None
        distributed = self.dist.distributed
        if distributed and self.model.ddp_options().get("broadcast_buffers", True):  # type: ignore[operator]
            broadcast_module_state(self.model, parameters=False)  # DDP's buffer broadcast before a forward
        out = grad_cache_step(self.model, batch, state, self.cfg.grad_cache_chunk, autocast=self._autocast,
                              scale_loss=self.scaler.scale if self.scaler is not None else None,  # type: ignore[arg-type]
                              check_loss=self._check_finite)
        if distributed:
            average_gradients(self.model)
        return out

    def _step(self, batch: Any, where: tuple[int, int, int], state: TrainState
              ) -> tuple[dict[str, torch.Tensor], float]:
        """One optimizer update; returns the detached logging scalars and the lr it used."""
        assert self._ddp_model is not None
        step, epoch, pos = where
        lr = float(self.optimizer.param_groups[0]["lr"])
        try:
            if self.cfg.grad_cache_chunk is not None:
                out = self._grad_cached_backward(batch, state)
                loss = out.loss
            else:
                with self._autocast():
                    out = self._ddp_model(batch, state)
                if not isinstance(out, StepOutput):
                    raise TypeError(f"the model's step must return a vgskit.contract.StepOutput, got "
                                    f"{type(out).__name__}")
                loss = out.loss
                self._check_finite(out)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            if self.cfg.grad_clip is not None:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if _is_retrieval_model(self.model):
                # On the bare model, after the update: an EMA teacher follows the weights just written.
                self.model.after_step(TrainState(step=state.step + 1, epoch=state.epoch,  # type: ignore[operator]
                                                 epoch_float=state.epoch_float, total_steps=state.total_steps))
        except VGSKitError:
            raise
        except Exception as e:
            raise TrainStepError(step, epoch, pos, f"{type(e).__name__}: {e}") from e
        scalars = {"loss": loss.detach().float().reshape(())}
        for k, v in out.losses.items():
            scalars[f"loss/{k}"] = v.detach().float().reshape(())
        for k, v in out.metrics.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                scalars[k] = v.detach().float().reshape(())
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                scalars[k] = torch.tensor(float(v), device=self.device)
        return scalars, lr

    # ---------------------------------------------------------------------------------------------- fit

    @contextlib.contextmanager
    def _run_folder_lock(self) -> Iterator[None]:
        """Hold ``<out_dir>/.lock`` (main rank) for the duration of the block; every rank raises if it is taken."""
        lock = FolderLock(self.out_dir, what="run folder") if D.is_main() else None
        refusal: tuple[bool, str] | None = None  # (held by another process, message)
        if lock is not None:
            try:
                check_output_folder(self.out_dir, "out_dir")
                lock.acquire()
            except FolderInUseError as e:
                refusal = (True, str(e))
            except ConfigError as e:
                refusal = (False, str(e))
            except OSError as e:
                refusal = (False, f"out_dir {self.out_dir}: cannot be created or locked for writing ({e})")
        refusal = D.broadcast_object(refusal)
        if refusal is not None:
            raise FolderInUseError(refusal[1]) if refusal[0] else ConfigError(refusal[1])
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def fit(self, resume: bool | str = False) -> dict[str, Any]:
        """Train until ``max_steps``/``epochs`` (or ``stop_after_steps``/``time_budget_s``); return a summary.

        ``resume=True`` continues from ``<out_dir>/checkpoints/latest`` if there is one (fresh start
        otherwise); a path continues from that checkpoint; ``False`` requires an out_dir without checkpoints.
        The run folder is locked throughout (see the module docstring): a second ``fit`` on it is refused.
        """
        with self._run_folder_lock():
            return self._fit(resume)

    def _fit(self, resume: bool | str) -> dict[str, Any]:
        cfg = self.cfg
        seed_everything(cfg.seed, self.dist.rank)
        resumed_at = self._resume(resume)
        if resumed_at is None and cfg.init_from:
            used = load_init_weights(self.model, cfg.init_from)
            if D.is_main():
                log.info("initialised the model from %s", used)
        p = self.progress
        if self.dist.distributed and self.cfg.grad_cache_chunk is not None:
            # Two passes per step do not fit DDP's one-backward-per-forward reducer: the gradient cache runs on
            # the bare model and averages the gradients itself (vgskit.train.gradcache); start from rank 0's
            # weights, as DDP does when it wraps a model.
            self._prepare_batchnorm()
            broadcast_module_state(self.model)
            self._ddp_model = self.model
        elif self.dist.distributed:
            self._prepare_batchnorm()
            ids = [self.device.index] if self.device.type == "cuda" else None
            options = self.model.ddp_options() if _is_retrieval_model(self.model) else {}  # type: ignore[operator]
            self._ddp_model = DistributedDataParallel(self.model, device_ids=ids, **options)
        else:
            self._ddp_model = self.model
        self._train_mode()

        main = D.is_main()
        metrics_log = MetricsLogger(self.out_dir, enabled=main, tensorboard=cfg.tensorboard)
        metrics_log.start(resumed_at)
        bar = tqdm(total=self.total_steps, initial=p.step, disable=not (main and self.progress_bar), dynamic_ncols=True,
                   desc="train")

        t_start = time.monotonic()
        elapsed_before = p.elapsed_s
        t_log, samples_since_log = time.monotonic(), 0
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        steps_this_call = 0
        last_saved, last_eval = (p.step if resumed_at is not None else -1), -1
        last_loss: float | None = None
        last_path: Path | None = None
        stop: str | None = None

        def should_stop(finished_only: bool = False) -> str | None:
            if cfg.max_steps is not None and p.step >= cfg.max_steps:
                return "max_steps"
            if cfg.epochs is not None and p.epoch >= cfg.epochs:
                return "epochs"
            if finished_only:
                return None
            if cfg.stop_after_steps is not None and steps_this_call >= cfg.stop_after_steps:
                return "stop_after_steps"
            if cfg.time_budget_s is not None and D.any_rank(
                    time.monotonic() - t_start > cfg.time_budget_s, self.device):
                return "time_budget"
            return None

        try:
            stop = should_stop(finished_only=True)  # a resumed run may already be complete
            while stop is None:
                batches = self._epoch_batches(p.epoch)
                if p.batch_in_epoch >= len(batches):  # a custom factory that got shorter; start next epoch
                    p.epoch, p.batch_in_epoch = p.epoch + 1, 0
                    stop = should_stop(finished_only=True)
                    continue
                n_batches = len(batches)
                local = [D.split_global_batch(b, self.dist.rank, self.dist.world_size)
                         for b in batches[p.batch_in_epoch:]]
                it = iter(self._loader(local, p.epoch, p.batch_in_epoch))
                for local_ids in local:
                    where = (p.step + 1, p.epoch, p.batch_in_epoch)
                    try:
                        batch = next(it)
                    except StopIteration:
                        raise TrainStepError(*where, "data loader ended early") from None
                    except Exception as e:
                        shown = ", ".join(map(str, local_ids[:8])) + (", ..." if len(local_ids) > 8 else "")
                        raise TrainStepError(*where, f"loading the batch (dataset indices {shown}) failed: "
                                                     f"{type(e).__name__}: {e}") from e
                    batch = move_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
                    state = self._state(p.step, p.epoch + p.batch_in_epoch / n_batches)
                    scalars, lr = self._step(batch, where, state)
                    # Per-name counts: a loss whose weight is 0 until some epoch is absent from earlier steps.
                    for k, v in scalars.items():
                        sums[k] = sums[k] + v if k in sums else v.clone()
                        counts[k] = counts.get(k, 0) + 1
                    gbs = len(batches[p.batch_in_epoch])
                    p.step += 1
                    p.batch_in_epoch += 1
                    p.samples_seen += gbs
                    samples_since_log += gbs
                    steps_this_call += 1
                    epoch_float = p.epoch + p.batch_in_epoch / n_batches
                    epoch_end = p.batch_in_epoch == n_batches
                    if epoch_end:
                        p.epoch, p.batch_in_epoch = p.epoch + 1, 0
                    bar.update(1)

                    if p.step % cfg.log_every == 0:
                        keys = sorted(sums)
                        n = torch.tensor([float(counts[k]) for k in keys], device=self.device)
                        means = (D.all_reduce_mean(torch.stack([sums[k] for k in keys])) / n).tolist()
                        now = time.monotonic()
                        values = dict(zip(keys, means, strict=True))
                        values.update(lr=lr, samples_per_s=samples_since_log / max(now - t_log, 1e-9))
                        last_loss = values.get("loss")
                        metrics_log.log("train", p.step, epoch_float, values)
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                                        sps=f"{values['samples_per_s']:.0f}", refresh=False)
                        sums, counts, t_log, samples_since_log = {}, {}, now, 0

                    stop = should_stop()
                    final = stop in ("max_steps", "epochs")
                    do_eval = self.evaluate_fn is not None and (
                        (isinstance(cfg.eval_every, int) and p.step % cfg.eval_every == 0)
                        or (cfg.eval_every == "epoch" and epoch_end) or (final and last_eval != p.step))
                    improved = False
                    if do_eval:
                        metrics = self._evaluate()
                        last_eval = p.step
                        if metrics is not None:
                            metrics_log.log("eval", p.step, epoch_float, metrics)
                            improved = self._is_improvement(metrics)
                            if main:
                                log.info("step %d eval: %s", p.step,
                                         ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                    periodic = cfg.ckpt_every is not None and p.step % cfg.ckpt_every == 0
                    if periodic or epoch_end or stop is not None or improved:
                        p.elapsed_s = elapsed_before + time.monotonic() - t_start
                        last_path = self._save(best=improved)
                        last_saved = p.step
                    if stop is not None:
                        break
                del it  # shuts down loader workers before the next epoch's loader starts
            if last_saved != p.step and p.step > 0:
                last_path = self._save(best=False)
        finally:
            bar.close()
            metrics_log.close()

        p.elapsed_s = elapsed_before + time.monotonic() - t_start
        best_dir = self.ckpt_root / "best"
        return {
            "step": p.step,
            "epoch": p.epoch,
            "batch_in_epoch": p.batch_in_epoch,
            "stopped_because": stop,
            "finished": stop in ("max_steps", "epochs"),
            "steps_this_call": steps_this_call,
            "samples_seen": p.samples_seen,
            "last_loss": last_loss,
            "best_metric": p.best_metric,
            "best_step": p.best_step,
            "last_checkpoint": str(last_path) if last_path is not None else None,
            "best_checkpoint": str(best_dir) if best_dir.is_dir() else None,
            "elapsed_s": p.elapsed_s,
            "resumed_from_step": resumed_at,
            "autocast": str(self.amp_dtype).removeprefix("torch.") if self.amp else None,
        }


__all__ = [
    "RandomBatches",
    "TrainStepError",
    "Trainer",
    "build_optimizer",
    "load_init_weights",
    "move_to_device",
    "param_groups_for_decay",
    "seed_everything",
]
