"""Atomic, pickle-free training checkpoints.

Layout under a checkpoint root (the Trainer uses ``<out_dir>/checkpoints``)::

    step_1200/
        model.safetensors        model state dict (shared tensors stored once, via safetensors.save_model)
        training_state.safetensors  tensors only training needs, which the exported model leaves out
                                 (``model.training_state()``, e.g. CMD's fusion encoder; absent when empty)
        config.json              model name + model config + train config
        trainer_state.json       step, epoch, position in the epoch, best metric, seed, world size, ...
        optimizer.safetensors    optimizer tensors (Adam moments, step counters)
        optimizer.json           optimizer structure and scalars (param groups, lrs, betas)
        scheduler.json           LR scheduler state
        scaler.json              AMP GradScaler state (only when AMP with a scaler is on)
        rng.safetensors/.json    RNG states of every rank (torch/CUDA tensors; python/numpy as JSON)
    latest                       text file holding the name of the newest complete checkpoint
    best/                        copy of the checkpoint that scored best on the selection metric

No Python object is pickled: tensors go to safetensors, everything else to JSON (tuples, non-string dict
keys and non-finite floats are tagged so they come back with their original types).

Atomicity: a checkpoint is written into ``.tmp-step_<N>-<pid>/`` and moved to ``step_<N>/`` with one
``os.replace`` (a rename, atomic on POSIX filesystems) after every file is flushed to disk; ``latest`` is then
replaced the same way. A process killed at any point leaves the previous checkpoint and ``latest`` intact;
stale ``.tmp-*`` folders are removed by the next save. A folder named ``step_<N>`` is therefore always complete.
A write that fails (a full disk) raises :class:`CheckpointWriteError` and leaves the previous step as it was.

``best/`` is a complete copy swapped in by rename, so it is never half-written; but it is updated after the
step folder and ``latest`` that record the new best step, and a process killed in between leaves ``best/``
holding an older step than the run recorded. Every reader therefore checks it (:func:`check_best`): a
``best/`` that disagrees with the ``best_step`` of the run's newest checkpoint is replaced by that step's
folder when it still exists (with a warning), and refused with a clear error otherwise; a resumed run
repairs it (:func:`repair_best`).

Files that are damaged after the fact (truncated by a full disk or a copy) are reported by name:
:func:`verify_checkpoint` reads every header, and a resumed run falls back to the newest complete step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from vgskit.errors import InputFileError
from vgskit.fileio import TMP_PREFIX, fsync_dir, write_text_atomic

STEP_DIR_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"
BEST = "best"
_TMP_PREFIX = TMP_PREFIX
_OLD_PREFIX = ".old-"
_TRAINER_STATE = "trainer_state.json"

log = logging.getLogger("vgskit.train")


class CheckpointError(InputFileError):
    """A checkpoint folder that is missing, incomplete or does not fit the model/optimizer it is loaded into."""

    kind = "checkpoint"


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (full disk, permissions); the previous one is left intact.

    Also an ``OSError``, so that code catching write failures as such keeps working; ``errno`` is the cause's.
    """

    def __init__(self, path: str | Path, problem: str, cause: OSError | None = None):
        super().__init__(path, problem)
        # errno only: with strerror set too, OSError.__str__ would print the bare cause instead of the message.
        self.errno = cause.errno if cause is not None else None  # type: ignore[misc]


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(path.parent, f"{path.name} is unreadable: truncated or not a safetensors file ({e})")


# ------------------------------------------------------------------------------- tensors <-> safetensors + JSON


def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts/lists/tuples/tensors/scalars) into a JSON structure and a tensor dict.

    Each tensor is replaced by ``{"__tensor__": key}`` where ``key`` is its dotted path in the structure.
    Anything that is neither a tensor nor JSON-representable raises ``TypeError`` naming its path, because
    the alternative (pickling) is exactly what this format avoids.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            # A copy, because safetensors refuses tensors that share storage and needs contiguous CPU memory.
            tensors[path] = x.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": path}
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            # Non-string keys (optimizer state is keyed by parameter index) must keep their type.
            return {"__items__": [[enc(k, f"{path}.key{i}"), enc(v, f"{path}.{k}" if path else str(k))]
                                  for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, np.generic):
            return enc(x.item(), path)
        raise TypeError(f"state entry {path or '<root>'}: {type(x).__name__} cannot be stored without pickling")

    return enc(obj, ""), tensors


def decode_state(structure: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(structure, list):
        return [decode_state(v, tensors) for v in structure]
    if isinstance(structure, dict):
        if set(structure) == {"__tensor__"}:
            return tensors[structure["__tensor__"]]
        if set(structure) == {"__tuple__"}:
            return tuple(decode_state(v, tensors) for v in structure["__tuple__"])
        if set(structure) == {"__float__"}:
            return float(structure["__float__"])
        if set(structure) == {"__items__"}:
            return {_hashable(decode_state(k, tensors)): decode_state(v, tensors) for k, v in structure["__items__"]}
        return {k: decode_state(v, tensors) for k, v in structure.items()}
    return structure


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def save_state(obj: Any, directory: Path, name: str) -> None:
    """Write ``obj`` as ``<name>.json`` (+ ``<name>.safetensors`` if it holds tensors) into ``directory``."""
    structure, tensors = encode_state(obj)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    _write_json(directory / f"{name}.json", structure)


def load_state(directory: Path, name: str, device: str | torch.device = "cpu") -> Any:
    """Read what :func:`save_state` wrote."""
    js = directory / f"{name}.json"
    if not js.is_file():
        raise CheckpointError(directory, f"missing {name}.json")
    structure = _read_json(js)
    st = directory / f"{name}.safetensors"
    try:
        tensors = load_file(str(st), device=str(device)) if st.is_file() else {}
    except (SafetensorError, OSError) as e:
        raise _unreadable(st, e) from e
    try:
        return decode_state(structure, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(directory, f"{name}.json does not match {name}.safetensors ({e!r})") from e


# ------------------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), python ``random`` and numpy global RNG states."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # The numpy key is a uint32 array; as a list of ints it is plain JSON and round-trips exactly.
        "numpy": [np_state[0], [int(v) for v in np_state[1]], int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global RNGs to a state from :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.to(torch.uint8).cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------------------------ file helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` (rename cannot overwrite a non-empty dir)."""
    old = None
    if dst.exists():
        old = dst.with_name(f"{_OLD_PREFIX}{dst.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None and not dst.exists():
            os.replace(old, dst)  # put the previous folder back rather than leave none
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(root: Path) -> None:
    """Clean up after a killed writer. A ``.old-X-PID`` folder whose ``X`` is missing means the process died
    between moving ``X`` aside and moving its replacement in (see :func:`_replace_dir`): put it back rather
    than lose ``X`` (e.g. ``best``)."""
    for p in list(root.iterdir()):
        if p.name.startswith(_OLD_PREFIX) and p.is_dir():
            original = root / p.name[len(_OLD_PREFIX):].rsplit("-", 1)[0]
            if not original.exists():
                os.replace(p, original)
    for p in root.iterdir():
        if p.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ save / load


def step_dir_name(step: int) -> str:
    return f"step_{int(step)}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete ``step_<N>`` folders under ``root`` as ``(N, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    trainer_state: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    rng_states: Sequence[Mapping[str, Any]] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``root/step_<step>/`` atomically, point ``root/latest`` at it and prune to ``keep_last`` folders.

    ``model`` must be the bare module (not the DDP wrapper) so that parameter names carry no ``module.``
    prefix. ``trainer_state`` and ``config`` must be JSON-representable. Returns the checkpoint folder.
    """
    root = Path(root)
    name = step_dir_name(step)
    final = root / name
    previous = latest_checkpoint(root)
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp.mkdir()
        _write_step(tmp, model=model, trainer_state=trainer_state, config=config, optimizer=optimizer,
                    scheduler=scheduler, scaler=scaler, rng_states=rng_states)
        _replace_dir(tmp, final)
    except (OSError, SafetensorError) as e:  # safetensors reports its own I/O failures as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        cause = e if isinstance(e, OSError) else None
        raise CheckpointWriteError(final, f"could not be written ({e}); {kept}", cause) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        write_text_atomic(root / LATEST, name + "\n")
    except OSError as e:
        # step_<N> is complete; readers fall back to the newest complete folder when the pointer lags behind.
        raise CheckpointWriteError(root / LATEST, f"could not be updated to {name} ({e})", e) from e
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


#: File of a checkpoint holding ``model.training_state()`` (see :meth:`vgskit.models.base.RetrievalModel.training_state`).
TRAINING_STATE = "training_state.safetensors"


def _training_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    get = getattr(model, "training_state", None)
    if not callable(get):
        return {}
    # Copies: safetensors needs contiguous CPU tensors that share no storage.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in get().items()}


def _write_step(
    tmp: Path,
    *,
    model: torch.nn.Module,
    trainer_state: Mapping[str, Any],
    config: Mapping[str, Any] | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    scaler: Any | None,
    rng_states: Sequence[Mapping[str, Any]] | None,
) -> None:
    """Every file of one checkpoint into the temporary folder ``tmp``, flushed to disk."""
    # save_model drops duplicate references to shared tensors (tied weights) that save_file rejects.
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    extra = _training_state(model)
    if extra:
        save_file(extra, str(tmp / TRAINING_STATE))
    _write_json(tmp / "config.json", dict(config or {}))
    _write_json(tmp / "trainer_state.json", dict(trainer_state))
    if optimizer is not None:
        save_state(optimizer.state_dict(), tmp, "optimizer")
    if scheduler is not None:
        save_state(scheduler.state_dict(), tmp, "scheduler")
    if scaler is not None:
        save_state(scaler.state_dict(), tmp, "scaler")
    if rng_states is not None:
        save_state(list(rng_states), tmp, "rng")
    for p in tmp.iterdir():
        _fsync_file(p)
    fsync_dir(tmp)


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step folders (never the one ``latest`` names); return removed."""
    root = Path(root)
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    latest = latest_checkpoint(root)
    removed = []
    for _, p in list_checkpoints(root)[:-keep_last]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        # Rename first so that a crash mid-delete leaves a stale ".old-" folder, not a half-empty step_<N>.
        doomed = p.with_name(f"{_OLD_PREFIX}{p.name}-{os.getpid()}")
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(p)
    return removed


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder ``root/latest`` names, or the newest complete ``step_<N>`` if the pointer is missing/stale."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8").strip()
        if target.name and (target / "trainer_state.json").is_file():
            return target
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def update_best(root: str | Path, step_dir: str | Path) -> Path:
    """Make ``root/best`` an exact copy of ``step_dir`` (copied aside and flushed first, then swapped in by
    rename, so that ``best/`` is never a partial copy; readers still check it, see :func:`check_best`)."""
    root, step_dir = Path(root), Path(step_dir)
    tmp = root / f"{_TMP_PREFIX}{BEST}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(step_dir, tmp)
        for p in tmp.iterdir():
            _fsync_file(p)
        fsync_dir(tmp)
        _replace_dir(tmp, root / BEST)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(root / BEST, f"could not be updated to {step_dir.name} ({e}); readers use "
                                                f"{step_dir.name}/ itself while best/ lags behind", e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / BEST


def _step_of(folder: Path) -> int | None:
    """The step a checkpoint folder's ``trainer_state.json`` records, or None when it has no readable one."""
    try:
        return int(json.loads((folder / _TRAINER_STATE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_best_step(root: str | Path) -> int | None:
    """The ``best_step`` recorded by the newest readable checkpoint under ``root`` (None: no best recorded).

    That record, not ``best/``, is the run's word on which step is best: it is written with the step folder,
    before ``best/`` is updated.
    """
    root = Path(root)
    newest = latest_checkpoint(root)
    folders = ([newest] if newest is not None else []) + [p for _, p in reversed(list_checkpoints(root))]
    for folder in folders:
        try:
            state = json.loads((folder / _TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        best = state.get("best_step") if isinstance(state, dict) else None
        return int(best) if isinstance(best, (int, float)) and not isinstance(best, bool) else None
    return None


def _is_checkpoint_root(root: Path) -> bool:
    return (root / LATEST).is_file() or bool(list_checkpoints(root))


def check_best(best_dir: str | Path) -> Path:
    """The folder holding the step the run recorded as best, given its ``best/`` folder.

    ``best_dir`` itself when it agrees with the record (or stands alone, outside a checkpoint root); the
    recorded ``step_<N>/`` folder, with a warning, when ``best/`` lags behind it (a process killed while
    updating it); :class:`CheckpointError` when neither holds the recorded step.
    """
    best_dir = Path(best_dir)
    root = best_dir.parent
    if not _is_checkpoint_root(root):
        if best_dir.is_dir():
            return best_dir
        raise CheckpointError(best_dir, "does not exist")
    recorded = recorded_best_step(root)
    have = _step_of(best_dir)
    if recorded is None:
        if best_dir.is_dir():
            return best_dir
        raise CheckpointError(best_dir, "does not exist: the run has recorded no best checkpoint (no "
                                        "select_metric, or no evaluation yet); load a step_<N>/ folder instead")
    if have == recorded:
        return best_dir
    holds = "nothing" if not best_dir.exists() else f"step {have}" if have is not None else "an unreadable copy"
    target = root / step_dir_name(recorded)
    if _step_of(target) == recorded:
        log.warning("%s holds %s but the run recorded step %d as its best (an interrupted update of best/); "
                    "using %s", best_dir, holds, recorded, target)
        return target
    raise CheckpointError(best_dir, f"holds {holds} but the run recorded step {recorded} as its best (an "
                                    f"interrupted update of best/), and {target.name}/ is gone; resume the run "
                                    "to repair best/, or load a step_<N>/ folder explicitly")


def repair_best(root: str | Path) -> str | None:
    """Bring ``root/best`` in line with the run's record after an interrupted update; say what was done.

    Returns None when ``best/`` already agrees (or no best is recorded), else a sentence for the log.
    """
    root = Path(root)
    recorded = recorded_best_step(root)
    best_dir = root / BEST
    have = _step_of(best_dir)
    if recorded is None or have == recorded:
        return None
    holds = "nothing" if not best_dir.exists() else f"step {have}" if have is not None else "an unreadable copy"
    target = root / step_dir_name(recorded)
    if _step_of(target) != recorded:
        return (f"{best_dir} holds {holds} but the run recorded step {recorded} as its best, and {target.name}/ "
                "is gone; best/ is left as it is until the next improvement (readers refuse it until then)")
    update_best(root, target)
    return f"{best_dir} held {holds} but the run recorded step {recorded} as its best; copied {target.name}/ into it"


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a checkpoint root (uses ``latest``) or a run folder holding ``checkpoints/``.

    A ``best/`` folder inside a checkpoint root is checked against the run's record (:func:`check_best`).
    """
    path = Path(path)
    if path.name == BEST and _is_checkpoint_root(path.parent):
        return check_best(path)
    if (path / _TRAINER_STATE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(path, "no checkpoint found (expected step_<N>/ folders or a 'latest' pointer)")


def resolve_model_folder(path: str | Path) -> Path:
    """The folder to load a trained model from, for everything a user may pass as ``--checkpoint``.

    Accepted: a saved model or checkpoint folder (``config.json`` + ``model.safetensors``), a checkpoint root,
    a run folder holding ``checkpoints/``, and the demo's output folder holding ``train/checkpoints/``. In a
    run, the checked best checkpoint (:func:`check_best`) wins, else the latest one.
    """
    given = Path(path)
    if not given.exists():
        raise CheckpointError(given, "does not exist")
    p = given
    for root in (given / "checkpoints", given / "train" / "checkpoints"):
        if root.is_dir():
            p = root
            break
    if p.name == BEST:
        folder: Path | None = check_best(p)
    elif (p / BEST).exists() or (_is_checkpoint_root(p) and recorded_best_step(p) is not None):
        folder = check_best(p / BEST)
    elif (p / "config.json").is_file():
        folder = p
    else:
        folder = latest_checkpoint(p)
    if folder is None or not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise CheckpointError(given, "holds no model (expected a model folder with config.json and "
                                     "model.safetensors, a run folder with checkpoints/, or the demo's output "
                                     "folder with train/checkpoints/)")
    return folder


def verify_checkpoint(path: str | Path) -> Path:
    """Check that every file of a checkpoint folder is readable; returns the folder.

    Reads each JSON file and each safetensors header (which covers the file's length, so a truncated or
    empty file is caught) without loading tensors. Raises :class:`CheckpointError` naming the first bad file.
    """
    folder = Path(path)
    state = _read_json(folder / _TRAINER_STATE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(folder, f"{_TRAINER_STATE} records no step")
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(folder, "model.safetensors is missing")
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise _unreadable(f, e) from e
        if not f.with_suffix(".json").is_file() and f.name not in ("model.safetensors", TRAINING_STATE):
            raise CheckpointError(folder, f"{f.with_suffix('.json').name} is missing")
    for f in sorted(folder.glob("*.json")):
        _read_json(f)
    return folder


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read besides the states it loaded into the given objects."""

    path: Path
    trainer_state: dict[str, Any]
    config: dict[str, Any]
    rng_states: list[dict[str, Any]] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.trainer_state.get("step", 0))


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint (folder, root or run folder, see :func:`resolve_checkpoint`) into the given objects.

    ``model`` must be the bare module. Optimizer tensors are moved to their parameters' device by
    ``Optimizer.load_state_dict``. Raises :class:`CheckpointError` naming the folder when something is
    missing or does not fit.
    """
    ckpt = resolve_checkpoint(path)
    if model is not None:
        weights = ckpt / "model.safetensors"
        try:
            load_model(model, str(weights), strict=strict, device=str(device))
        except SafetensorError as e:
            raise _unreadable(weights, e) from e
        except FileNotFoundError as e:
            raise CheckpointError(ckpt, "model.safetensors is missing") from e
        except (RuntimeError, OSError) as e:
            raise CheckpointError(ckpt, f"model weights do not fit: {e}") from e
        _load_training_state(ckpt, model, device)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(load_state(ckpt, "optimizer"))
        if scheduler is not None:
            scheduler.load_state_dict(load_state(ckpt, "scheduler"))
        if scaler is not None and (ckpt / "scaler.json").is_file():
            scaler.load_state_dict(load_state(ckpt, "scaler"))
    except CheckpointError:
        raise
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(ckpt, f"optimizer/scheduler state does not fit: {e}") from e
    config = _read_json(ckpt / "config.json") if (ckpt / "config.json").is_file() else {}
    state = _read_json(ckpt / "trainer_state.json")
    try:
        rng = load_state(ckpt, "rng") if (ckpt / "rng.json").is_file() else []
    except CheckpointError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise CheckpointError(ckpt, f"RNG state is unreadable: {e}") from e
    return LoadedCheckpoint(ckpt, state, config, list(rng))


def _load_training_state(ckpt: Path, model: torch.nn.Module, device: str | torch.device) -> None:
    """Restore ``model.training_state()`` from the checkpoint; an error when one side has it and the other not."""
    path = ckpt / TRAINING_STATE
    wanted = _training_state(model)
    if not path.is_file():
        if wanted:
            raise CheckpointError(ckpt, f"{TRAINING_STATE} is missing, but the model keeps training-only tensors "
                                        f"({', '.join(sorted(wanted)[:4])}, ...) that a resumed run needs")
        return
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from e
    loader = getattr(model, "load_training_state", None)
    if not callable(loader):
        raise CheckpointError(ckpt, f"{TRAINING_STATE} holds tensors but the model has no load_training_state")
    try:
        loader(tensors)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(ckpt, f"{TRAINING_STATE} does not fit the model: {e}") from e


def _read_json(path: Path) -> Any:
    """JSON of a checkpoint file, with an error that names the file when it is missing or corrupt."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(path.parent, f"{path.name} is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path.parent, f"{path.name} is not valid JSON ({e})") from e


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint (folder, root or run folder)."""
    return _read_json(resolve_checkpoint(path) / _TRAINER_STATE)


__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "LoadedCheckpoint",
    "capture_rng_state",
    "check_best",
    "decode_state",
    "encode_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_state",
    "prune_checkpoints",
    "read_trainer_state",
    "recorded_best_step",
    "repair_best",
    "resolve_checkpoint",
    "resolve_model_folder",
    "restore_rng_state",
    "save_checkpoint",
    "save_state",
    "update_best",
    "verify_checkpoint",
    "write_text_atomic",
]
