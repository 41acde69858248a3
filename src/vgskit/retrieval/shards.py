"""Embedding a gallery in shards: a pool of worker processes, each shard saved as it is done, resumable.

``vgskit index`` embeds a split's images (and spoken captions) in fixed shards of ``shard_size`` rows. Each
shard is written to the work folder under a temporary name and renamed into place once flushed, so a shard
file is either whole or absent; a rerun after an interruption (a kill, a bad image, a full disk) loads the
finished shards and embeds only the others. The work folder also records what its shards were computed from
(the model's identity, the item keys, the shard and batch sizes): shards of another build are discarded, never
mixed in. Shards cover fixed rows with fixed batches, so a resumed build gives the same bytes as an
uninterrupted one.

Workers are forked processes (they inherit the model and the dataset; each runs ``torch`` with its share of the
threads). Example::

    from vgskit.retrieval.shards import build_options
    with build_options(workers=4, work_dir="runs/x/index.work", index_kind="auto"):
        engine = SearchEngine.build_from_dataset(model, dataset)   # picks the options up
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vgskit.contract import Embeddings
from vgskit.errors import VGSKitError
from vgskit.fileio import fsync_dir, temp_path_for
from vgskit.retrieval import ann as ann_mod

DEFAULT_SHARD_SIZE = 1024


@dataclass(frozen=True)
class BuildOptions:
    """How an index is built: worker processes, the work folder for shards, the index kind and its budget."""

    workers: int = 1
    work_dir: Path | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    index_kind: str = "auto"
    memory_budget_mb: float = ann_mod.DEFAULT_MEMORY_BUDGET_MB
    captions: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise VGSKitError(f"workers must be an integer >= 1, got {self.workers!r}")
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise VGSKitError(f"shard_size must be an integer >= 1, got {self.shard_size!r}")
        ann_mod.check_index_kind(self.index_kind)
        if not (isinstance(self.memory_budget_mb, (int, float)) and self.memory_budget_mb > 0):
            raise VGSKitError(f"memory budget must be a positive number of MiB, got {self.memory_budget_mb!r}")


_OPTIONS: ContextVar[BuildOptions | None] = ContextVar("vgskit_index_build_options", default=None)


@contextlib.contextmanager
def build_options(**kwargs: Any) -> Iterator[BuildOptions]:
    """Options for the index builds inside the ``with`` block (arguments given to a build still win).

    This is how ``vgskit index`` reaches :meth:`SearchEngine.build_from_dataset` through
    :func:`vgskit.experiment.build_index`, which loads the model and the dataset.
    """
    if kwargs.get("work_dir") is not None:
        kwargs["work_dir"] = Path(kwargs["work_dir"])
    opts = BuildOptions(**kwargs)
    token = _OPTIONS.set(opts)
    try:
        yield opts
    finally:
        _OPTIONS.reset(token)


def resolve_options(**given: Any) -> BuildOptions:
    """The options in effect: the ``build_options`` block's (or the defaults), overridden by non-None ``given``."""
    base = _OPTIONS.get() or BuildOptions()
    changes = {k: (Path(v) if k == "work_dir" else v) for k, v in given.items() if v is not None}
    return replace(base, **changes)


# The job of the forked workers: set in the parent before the pool starts, inherited by fork.
_JOB: dict[str, Any] = {}


def _shard_path(work_dir: Path, label: str, shard: int) -> Path:
    return work_dir / f"{label}-{shard:06d}.safetensors"


def _embed_shard(shard: int) -> int:
    job = _JOB
    start = shard * job["shard_size"]
    end = min(start + job["shard_size"], job["n"])
    parts = [job["fn"](range(s, min(s + job["batch_size"], end))) for s in range(start, end, job["batch_size"])]
    emb = Embeddings.cat(parts)
    tensors = {"pooled": emb.pooled.contiguous()}
    if emb.tokens is not None and emb.mask is not None:
        tensors.update(tokens=emb.tokens.contiguous(), mask=emb.mask.contiguous())
    path = _shard_path(job["work_dir"], job["label"], shard)
    tmp = temp_path_for(path)
    try:
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return shard


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _load_shard(path: Path, rows: int) -> Embeddings | None:
    """A finished shard, or None when it is absent or not whole (then it is embedded again)."""
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        emb = Embeddings(t["pooled"], t.get("tokens"), t.get("mask"))
    except (SafetensorError, KeyError, OSError, RuntimeError, VGSKitError):
        return None
    return emb if emb.pooled.shape[0] == rows else None


def _fingerprint(label: str, keys: Sequence[str], model: Any, batch_size: int, shard_size: int) -> dict[str, Any]:
    from vgskit.retrieval.engine import model_identity

    digest = hashlib.sha256("\n".join(str(k) for k in keys).encode("utf-8")).hexdigest()
    return {"label": label, "count": len(keys), "keys_sha256": digest, "model": model_identity(model)["sha256"],
            "batch_size": batch_size, "shard_size": shard_size}


def embed_in_shards(fn: Callable[[range], Embeddings], n: int, *, label: str, keys: Sequence[str], model: Any,
                    batch_size: int, options: BuildOptions, progress: bool = False) -> Embeddings:
    """Embeddings of rows ``0..n-1``, ``fn(rows)`` giving those of one batch of rows (float32, CPU).

    Without a work folder and with one worker this is a plain loop over batches. With a work folder the rows
    are cut into shards of ``options.shard_size``; finished shards found there (from the same model, keys and
    sizes) are reused, the others are embedded by ``options.workers`` processes and saved as they finish.
    """
    if batch_size < 1:
        raise VGSKitError(f"batch_size must be >= 1, got {batch_size}")
    if options.work_dir is None and options.workers == 1:
        parts = [fn(range(s, min(s + batch_size, n))) for s in _progress(range(0, n, batch_size), progress, label)]
        return Embeddings.cat(parts)
    work_dir = options.work_dir
    own_dir = work_dir is None
    if work_dir is None:  # workers without a folder: a private one, removed afterwards
        import tempfile

        work_dir = Path(tempfile.mkdtemp(prefix="vgskit-shards-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    shard_size = options.shard_size
    n_shards = (n + shard_size - 1) // shard_size
    fingerprint = _fingerprint(label, keys, model, batch_size, shard_size)
    record = work_dir / f"{label}.json"
    try:
        previous = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    except (OSError, json.JSONDecodeError):
        previous = None
    if previous != fingerprint:  # shards of another build (or none yet): start this label afresh
        for old in work_dir.glob(f"{label}-*.safetensors"):
            old.unlink()
        tmp = temp_path_for(record)
        tmp.write_text(json.dumps(fingerprint), encoding="utf-8")
        os.replace(tmp, record)
        fsync_dir(work_dir)
    rows_of = [min(shard_size, n - s * shard_size) for s in range(n_shards)]
    done = {s: e for s in range(n_shards) if (e := _load_shard(_shard_path(work_dir, label, s), rows_of[s])) is not None}
    todo = [s for s in range(n_shards) if s not in done]
    if progress and done:
        print(f"{label}: {len(done)} of {n_shards} shards already embedded in {work_dir}, {len(todo)} to go",
              flush=True)
    _JOB.clear()
    _JOB.update(fn=fn, n=n, batch_size=batch_size, shard_size=shard_size, work_dir=work_dir, label=label)
    try:
        if options.workers == 1 or len(todo) <= 1:
            for s in _progress(todo, progress, label):
                _embed_shard(s)
        else:
            threads = max(1, torch.get_num_threads() // options.workers)
            ctx = multiprocessing.get_context("fork")  # workers inherit the model and the dataset
            with ctx.Pool(min(options.workers, len(todo)), initializer=_worker_init, initargs=(threads,)) as pool:
                for _ in _progress(pool.imap_unordered(_embed_shard, todo), progress, label, total=len(todo)):
                    pass
        parts = []
        for s in range(n_shards):
            emb = done.get(s) or _load_shard(_shard_path(work_dir, label, s), rows_of[s])
            if emb is None:
                raise VGSKitError(f"{_shard_path(work_dir, label, s)}: the shard was not written whole")
            parts.append(emb)
    finally:
        _JOB.clear()
        if own_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return Embeddings.cat(parts)


def _progress(it: Any, enabled: bool, label: str, total: int | None = None) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=f"embedding {label}", total=total, unit="shard" if total is not None else "batch")
