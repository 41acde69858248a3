"""Frozen-feature cache: run a frozen tower once over a corpus, then train from memory-mapped fp16 features.

A frozen speech or image tower gives the same output for a file every epoch, and on most setups it costs
far more than the trainable head on top of it. :func:`extract` runs it once and stores its outputs;
:class:`CachedSpokenCaptionDataset` + :func:`collate_cached_captions` serve them back, and
:class:`CachedSpeechEncoder` / :class:`CachedImageEncoder` stand in for the towers, so a model written for
``encoder(batch["wavs"], batch["lengths"])`` and ``encoder(batch["pixels"])`` trains unchanged.

Layout of ``root/<tower_key>/``:

* ``index.json``: format version, the extraction options, tower metadata (width, frame rate, layers) and,
  per item, its source file and the offset/shape of each of its arrays; replaced atomically.
* ``<array>.bin``: one flat float16 file per array name (``hidden`` for speech, ``tokens``/``pooled`` for
  images), read through ``numpy.memmap``. Utterances have different frame counts, so one flat file with
  offsets is used instead of one ``.npy`` per array (no ragged arrays, one file handle, one mapping).
* ``tower.json``: the tower description the key was hashed from, for people wondering what a folder holds.

Keys. :func:`tower_key` hashes the tower's class, its configuration (vgskit and transformers), its
preprocessing, a hash of every weight and buffer, and the :class:`ExtractionOptions` (which include the
precision the tower ran at: a bf16 cache has another key, so another folder, than the fp32 one). Hashing the weights
rather than their file's name or mtime also catches re-initialised layers and in-memory edits. A cache
built for another tower or other options therefore lives in another folder and is never reused by
mistake; :func:`extract` also recomputes the key of the tower it is given and refuses a mismatch. Each item
is keyed by the hash of ``(tower key, absolute path, size, mtime_ns)`` of its input file, so an edited file
is extracted again (its stale entry is dropped from the index).

Resuming. Arrays are appended to the ``.bin`` files; the index is rewritten (data fsynced first, then the
index replaced atomically) every ``flush_every`` items, at most once per ``flush_interval`` seconds (the
index of a large corpus is megabytes, rewriting it every few items would cost more than extraction), and
when extraction ends or fails. A killed extraction loses at most the items since the last flush: on reopen
the ``.bin`` files are cut back to the sizes the index records, and :func:`extract` only runs missing items.

Concurrency. Writers to one folder exclude each other with an advisory ``fcntl.flock`` on ``.writer.lock``,
held for a whole extraction (appends, flushes and the index replacement); each writer re-reads the index once
it holds the lock, so a second training waits for the first and then extracts only what is still missing
(two unlocked writers used to append at offsets computed from the same stale index and leave most items
pointing at another item's bytes). The lock dies with its process (the OS drops it), so a killed writer never
blocks the next one. Readers take no lock: the data files only grow (or are cut back, under the lock, to what
the latest index covers), and items become visible only when an index that points at fsynced bytes replaces
the previous one atomically, so a reader, also one that opened the cache before an append, only ever reads
complete items. :func:`verify_cache` (``vgskit cache verify``) checks the structure and recomputes a sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vgskit.contract import Batch, SpeechInputs
from vgskit.data.manifest import Record
from vgskit.errors import ConfigError, VGSKitError
from vgskit.fileio import fsync_dir, write_text_atomic
from vgskit.images import ImageTransform
from vgskit.layers import ImageEncoderOutput, SpeechEncoderOutput, lengths_to_mask
from vgskit.precision import autocast, resolve_precision, validate_precision

# Format 2: written under the writer lock. Caches of format 1 may hold the interleaved appends of unlocked
# concurrent writers, which cannot be told apart from good data, so they are not reused (another key, so
# another folder: they are extracted again once).
CACHE_FORMAT = 2
INDEX_NAME = "index.json"
TOWER_NAME = "tower.json"
LOCK_NAME = ".writer.lock"
#: Seconds a writer waits for another one to finish before giving up (a large corpus takes hours to extract,
#: a few minutes of waiting are normal).
DEFAULT_LOCK_TIMEOUT = 3600.0
_LOCK_POLL = 0.05
STORE_DTYPE = np.float16
_ITEM_BYTES = np.dtype(STORE_DTYPE).itemsize
Kind = Literal["speech", "image"]


class FeatureCacheError(VGSKitError):
    """A feature cache that cannot be used (corrupt or truncated files, another tower, missing items)."""


@dataclass(frozen=True)
class ExtractionOptions:
    """What is extracted from a tower; part of the cache key.

    Attributes:
        kind: ``"speech"`` (waveform tower, :class:`SpeechEncoderOutput`) or ``"image"``
            (:class:`ImageEncoderOutput`).
        layers: speech only: indices into ``hidden_states`` to keep (negative ones count from the end;
            ``None``: every hidden state). The last kept one becomes ``last_hidden_state`` when read back.
        pooled: speech: store the mean over valid frames of each kept layer (``[L, D]``) instead of frames
            (``[L, T, D]``); image: store only the pooled vector, not the patch tokens.
        max_seconds: speech only: crop utterances to their first ``max_seconds`` before the tower (as
            :class:`~vgskit.data.loader.SpokenCaptionDataset` does), ``None``: whole files.
        image_transform: image only: the preprocessing that makes the tower's pixels (``None``: the tower's
            own ``transform``, else the :class:`~vgskit.images.ImageTransform` defaults). Training from a
            cache passes the model's ``image_transform`` here, so cached features come from exactly the
            pixels the live model would see.
        precision: ``"fp32"`` or ``"bf16"``: the autocast the tower runs under (:mod:`vgskit.precision`;
            stored features are float16 either way). Choose it with
            :func:`~vgskit.precision.resolve_precision` for the extraction device, so that a machine without
            native bf16 falls back to, and reuses, the fp32 cache.
    """

    kind: Kind = "speech"
    layers: tuple[int, ...] | None = None
    pooled: bool = False
    max_seconds: float | None = None
    image_transform: ImageTransform | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.kind not in ("speech", "image"):
            raise ConfigError(f"ExtractionOptions.kind must be 'speech' or 'image', got {self.kind!r}")
        try:
            validate_precision(self.precision)
        except ConfigError as exc:
            raise ConfigError(f"ExtractionOptions.precision: {exc}") from None
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
            if not self.layers:
                raise ConfigError("ExtractionOptions.layers must name at least one layer (or be None)")
            if self.kind == "image":
                raise ConfigError("ExtractionOptions.layers applies to speech towers only")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"ExtractionOptions.max_seconds must be positive or None, got {self.max_seconds!r}")
        if self.image_transform is not None:
            if self.kind != "image":
                raise ConfigError("ExtractionOptions.image_transform applies to image towers only")
            if isinstance(self.image_transform, dict):
                object.__setattr__(self, "image_transform", ImageTransform.from_json(dict(self.image_transform)))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``layers`` as a list; ``image_transform`` only when set and ``precision`` only when
        not fp32, so that caches keyed before these fields existed keep their keys)."""
        d = dataclasses.asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        if self.image_transform is None:
            del d["image_transform"]
        else:
            d["image_transform"] = self.image_transform.to_json()
        if self.precision == "fp32":
            del d["precision"]
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExtractionOptions:
        """Inverse of :meth:`to_json`."""
        layers = data.get("layers")
        return cls(
            kind=data.get("kind", "speech"),
            layers=None if layers is None else tuple(layers),
            pooled=bool(data.get("pooled", False)),
            max_seconds=data.get("max_seconds"),
            image_transform=data.get("image_transform"),
            precision=data.get("precision", "fp32"),
        )


# ---------------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------------


def weights_fingerprint(module: nn.Module) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes and bytes) of ``module``.

    Reading a base-size tower's weights costs a fraction of a second, negligible next to extraction, and
    unlike the weight file's size/mtime it sees re-initialised layers and weights changed in memory.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    # Dataclasses and transformers configs → JSON-ready dicts; the library version is left out so that an
    # upgrade does not orphan every cache (weights and config fields still have to match).
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "to_dict"):
        d = dict(value.to_dict())
        d.pop("transformers_version", None)
        return d
    return value


def tower_description(tower: nn.Module, options: ExtractionOptions) -> dict[str, Any]:
    """Everything :func:`tower_key` hashes, as a JSON-ready dict."""
    desc: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "class": f"{type(tower).__module__}.{type(tower).__qualname__}",
        "options": options.to_json(),
        "weights": weights_fingerprint(tower),
    }
    for attr in ("config", "hf_config", "preprocessing", "transform"):
        if hasattr(tower, attr):
            desc[attr] = _plain(getattr(tower, attr))
    return desc


def _hash_json(obj: Any, n_hex: int = 16) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=n_hex // 2).hexdigest()


def tower_key(
    tower: nn.Module,
    options: ExtractionOptions | None = None,
    *,
    kind: Kind = "speech",
    layers: Sequence[int] | None = None,
    pooled: bool = False,
    max_seconds: float | None = None,
    precision: str = "fp32",
) -> str:
    """Stable 16-hex-digit key of ``tower`` (config + weight hash) and the extraction options.

    Pass either ``options`` or the individual fields.
    """
    if options is None:
        options = ExtractionOptions(kind, None if layers is None else tuple(layers), pooled, max_seconds,
                                    precision=precision)
    return _hash_json(tower_description(tower, options))


def _read_holder(path: Path) -> dict[str, Any]:
    """The pid/host/time a lock holder wrote into its lock file (``{}`` if none or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_holder(lock_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Whether a process holds the writer lock file ``lock_path``: what it recorded, or ``None`` if free.

    Probes with a non-blocking shared lock, released at once (a writer retrying meanwhile just polls again).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        handle = open(lock_path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:
        return None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(Path(lock_path))
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return None
    finally:
        handle.close()


def file_identity(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """``(absolute path, size, mtime_ns)`` of an input file; a changed file gets a new identity."""
    p = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(p)
    except OSError as exc:
        raise FeatureCacheError(f"input file {p}: cannot stat ({exc.strerror or exc})") from exc
    return p, int(st.st_size), int(st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    source: str
    arrays: dict[str, tuple[int, tuple[int, ...]]]  # name -> (offset in elements, shape)


@dataclass
class _Index:
    options: ExtractionOptions
    meta: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # array name -> elements in its .bin
    items: dict[str, _Entry] = field(default_factory=dict)


class FeatureCache:
    """Memory-mapped fp16 features of one tower configuration, in ``root/<tower_key>/``.

    Args:
        root: folder holding one sub-folder per tower key.
        tower_key: from :func:`tower_key` (or use :meth:`for_tower`).
        options: the extraction options; required to create a cache, checked against an existing one.

    Reading: :meth:`get` (``{name: float16 Tensor}``), :meth:`key_for`, ``path in cache``; an open cache is a
    snapshot of the last flushed index (:meth:`reload` sees later flushes). Writing: inside :meth:`writing`
    (the folder's writer lock), :meth:`put` then :meth:`flush`; :func:`extract` does all of it. :meth:`put`
    and :meth:`flush` outside :meth:`writing` take the lock themselves and keep it until :meth:`close`.
    """

    def __init__(self, root: str | os.PathLike[str], tower_key: str, options: ExtractionOptions | None = None):
        if not tower_key or any(c in tower_key for c in "/\\") or tower_key in (".", ".."):
            raise ConfigError(f"FeatureCache: invalid tower key {tower_key!r}")
        self.root = Path(root)
        self.tower_key = tower_key
        self.folder = self.root / tower_key
        self.index_path = self.folder / INDEX_NAME
        self.lock_path = self.folder / LOCK_NAME
        self._maps: dict[str, np.memmap] = {}
        self._writers: dict[str, Any] = {}
        self._lock_handle: Any = None
        self._lock_depth = 0
        self._lazy_lock = False
        self._pending = 0
        self._last_flush = time.monotonic()
        if self.index_path.exists():
            self._index = self._read_index()
            if options is not None and options != self._index.options:
                raise FeatureCacheError(
                    f"{self.index_path}: cache was built with {self._index.options}, not {options}"
                )
        else:
            if options is None:
                raise FeatureCacheError(
                    f"no feature cache at {self.folder} (no {INDEX_NAME}); extract features first"
                )
            self._index = _Index(options)
        self._by_source = {e.source: k for k, e in self._index.items.items()}

    @classmethod
    def for_tower(
        cls, root: str | os.PathLike[str], tower: nn.Module, options: ExtractionOptions | None = None
    ) -> FeatureCache:
        """Open (or prepare) the cache of ``tower`` under ``options`` (default: speech, all layers, frames)."""
        options = options or ExtractionOptions()
        desc = tower_description(tower, options)
        cache = cls(root, _hash_json(desc), options)
        if not (cache.folder / TOWER_NAME).exists():
            cache.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache.folder / TOWER_NAME, json.dumps(desc, indent=1, sort_keys=True, default=str))
        return cache

    # -- writer lock -------------------------------------------------------------------------------------------

    def lock_holder(self) -> dict[str, Any] | None:
        """What the process holding the writer lock recorded (``pid``, ``host``, ``since``), or ``None``
        when no process holds it. A holder that has just taken the lock may not have written yet: ``{}``."""
        if self._lock_handle is not None:
            return _read_holder(self.lock_path)
        return lock_holder(self.lock_path)

    def _holder_text(self) -> str:
        info = _read_holder(self.lock_path)
        if not info or "pid" not in info:
            return "another process (it has not recorded its pid yet)"
        since = info.get("since")
        when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        return f"pid {info['pid']} on host {info.get('host', '?')}{when}"

    def _acquire_lock(self, timeout: float | None, announce: bool) -> None:
        if self._lock_handle is not None:
            self._lock_depth += 1
            return
        try:
            import fcntl
        except ImportError as exc:  # pragma: no cover - not POSIX
            raise FeatureCacheError(
                f"feature cache {self.folder}: writing needs POSIX file locks (fcntl), which this platform lacks"
            ) from exc
        if timeout is not None and timeout < 0:
            raise ConfigError(f"lock timeout must be >= 0 seconds or None, got {timeout}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open while locked
        except OSError as exc:
            raise FeatureCacheError(
                f"feature cache {self.folder}: cannot create the writer lock {self.lock_path} "
                f"({exc.strerror or exc}); is the folder writable?"
            ) from exc
        start = time.monotonic()
        announced = False
        try:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                except OSError as exc:  # ENOLCK, EOPNOTSUPP...: unlocked writes could corrupt the cache
                    raise FeatureCacheError(
                        f"feature cache {self.folder}: cannot lock {self.lock_path} ({exc.strerror or exc}): the "
                        "file system does not support file locks, so concurrent writers could not be kept apart; "
                        "put the cache on a file system that does (a local disk)"
                    ) from exc
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise FeatureCacheError(
                        f"feature cache {self.folder} is being written by {self._holder_text()}; gave up waiting "
                        f"after {waited:.0f} s. Let that extraction finish (its items are then reused) or stop it, "
                        "then run again"
                    )
                if announce and not announced:
                    print(f"feature cache {self.folder}: {self._holder_text()} is writing it; waiting for it to "
                          "finish (its items are reused)", file=sys.stderr, flush=True)
                    announced = True
                time.sleep(_LOCK_POLL if timeout is None else max(0.0, min(_LOCK_POLL, timeout - waited)))
            # Informational only (who holds the lock, for the messages above); the lock is the flock itself.
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
            handle.flush()
        except BaseException:
            handle.close()
            raise
        self._lock_handle = handle
        self._lock_depth = 1
        try:
            self.reload()  # what earlier writers flushed: extract only what is still missing, append after it
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._lock_handle is None:
            return
        self._lock_depth -= 1
        if self._lock_depth > 0:
            return
        import fcntl

        handle, self._lock_handle = self._lock_handle, None
        try:
            handle.seek(0)
            handle.truncate()
        except OSError:
            pass
        finally:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            finally:
                handle.close()

    def _ensure_lock(self) -> None:
        # put()/flush() outside writing(): take the lock now, keep it until close().
        if self._lock_handle is None:
            self._acquire_lock(DEFAULT_LOCK_TIMEOUT, announce=False)
            self._lazy_lock = True

    @contextmanager
    def writing(self, timeout: float | None = DEFAULT_LOCK_TIMEOUT, announce: bool = False) -> Iterator[FeatureCache]:
        """Hold the folder's writer lock for a block of :meth:`put` calls; flush and release on exit.

        Waits while another process (or another :class:`FeatureCache` of this folder) writes, at most
        ``timeout`` seconds (``None``: no limit), then raises :class:`FeatureCacheError` naming the folder and
        the holder's pid. ``announce`` prints one line to stderr when it has to wait. Once the lock is held
        the index is re-read, so items another writer added meanwhile are seen (and not extracted again).
        Items put inside the block are flushed on exit, also when the block raises (they are complete).
        """
        self._acquire_lock(timeout, announce)
        try:
            yield self
        finally:
            try:
                if self._lock_depth == 1:
                    self._close_writers()
            finally:
                self._release_lock()

    def reload(self) -> None:
        """Re-read the index from disk, to see items that other writers flushed since this cache was opened."""
        if self._pending:
            raise FeatureCacheError(f"{self.folder}: reload() with {self._pending} unflushed items; flush first")
        if not self.index_path.exists():
            return
        fresh = self._read_index()
        if fresh.options != self._index.options:
            raise FeatureCacheError(f"{self.index_path}: cache was built with {fresh.options}, not {self.options}")
        mine = self._index.meta
        self._index = fresh
        self.set_meta(mine)  # metadata recorded in memory before the reload must agree with the file's
        self._by_source = {e.source: k for k, e in self._index.items.items()}
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        self._maps.clear()

    # -- index -------------------------------------------------------------------------------------------------

    def _corrupt(self, problem: str) -> FeatureCacheError:
        return FeatureCacheError(
            f"feature cache index {self.index_path}: {problem}; delete {self.folder} to extract again"
        )

    def _read_index(self) -> _Index:
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise self._corrupt(f"unreadable ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise self._corrupt(f"corrupt or truncated JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(data, dict):
            raise self._corrupt("not a JSON object")
        if data.get("format") != CACHE_FORMAT:
            raise self._corrupt(f"format {data.get('format')!r}, this version reads format {CACHE_FORMAT}")
        if data.get("tower_key") != self.tower_key:
            raise self._corrupt(f"written for tower key {data.get('tower_key')!r}, not {self.tower_key!r}")
        try:
            index = _Index(
                ExtractionOptions.from_json(data["options"]),
                dict(data.get("meta", {})),
                {str(k): int(v) for k, v in data["sizes"].items()},
            )
            for key, raw in data["items"].items():
                arrays = {str(n): (int(off), tuple(int(s) for s in shape)) for n, (off, shape) in raw["arrays"].items()}
                for name, (off, shape) in arrays.items():
                    if off < 0 or off + math.prod(shape) > index.sizes.get(name, -1):
                        raise ValueError(f"item {key} array {name!r} lies outside the recorded data")
                index.items[str(key)] = _Entry(str(raw["source"]), arrays)
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
            raise self._corrupt(f"malformed ({type(exc).__name__}: {exc})") from exc
        for name, n in index.sizes.items():
            path = self._bin(name)
            have = path.stat().st_size if path.exists() else -1
            if have < n * _ITEM_BYTES:
                raise FeatureCacheError(
                    f"feature cache data file {path} is truncated ({max(have, 0)} bytes, the index "
                    f"{self.index_path} expects {n * _ITEM_BYTES}); delete {self.folder} to extract again"
                )
        return index

    def _bin(self, name: str) -> Path:
        return self.folder / f"{name}.bin"

    @property
    def options(self) -> ExtractionOptions:
        """The :class:`ExtractionOptions` of this cache."""
        return self._index.options

    @property
    def meta(self) -> dict[str, Any]:
        """Tower metadata recorded at extraction (``width``, ``frame_rate``, ``layers``, shapes...)."""
        return self._index.meta

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Record tower metadata; refuses to change what earlier extraction recorded."""
        for k, v in meta.items():
            if k in self._index.meta and self._index.meta[k] != v:
                raise FeatureCacheError(f"{self.index_path}: metadata {k}={self._index.meta[k]!r}, now {v!r}")
        self._index.meta.update(meta)

    @property
    def data_sizes(self) -> dict[str, int]:
        """Float16 values each ``<array>.bin`` holds according to the index (a copy)."""
        return dict(self._index.sizes)

    def __len__(self) -> int:
        return len(self._index.items)

    def key_for(self, path: str | os.PathLike[str]) -> str:
        """Item key of ``path`` as it is now (hash of tower key, absolute path, size and mtime)."""
        return _hash_json([self.tower_key, *file_identity(path)], n_hex=24)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and self.key_for(path) in self._index.items

    def has_key(self, key: str) -> bool:
        """Whether item ``key`` is stored."""
        return key in self._index.items

    def shapes(self, key: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the arrays of item ``key`` (no data read)."""
        return {n: shape for n, (_, shape) in self._entry(key).arrays.items()}

    def _entry(self, key: str) -> _Entry:
        try:
            return self._index.items[key]
        except KeyError:
            raise FeatureCacheError(f"item {key} is not in the feature cache {self.folder}") from None

    def _map(self, name: str, end: int) -> np.memmap:
        mm = self._maps.get(name)
        if mm is None or mm.shape[0] < end:
            if name in self._writers:
                self._writers[name].flush()  # items put but not yet flushed are read back by their writer
            # (Re)map lazily: the file grows while extracting, and each DataLoader worker maps it itself.
            mm = np.memmap(self._bin(name), dtype=STORE_DTYPE, mode="r", shape=(self._index.sizes[name],))
            self._maps[name] = mm
        return mm

    def get(self, key_or_path: str | os.PathLike[str]) -> dict[str, Tensor]:
        """Arrays of one item (by key, or by input path) as float16 tensors."""
        key = key_or_path if isinstance(key_or_path, str) and key_or_path in self._index.items else None
        entry = self._entry(key if key is not None else self.key_for(key_or_path))
        out = {}
        for name, (off, shape) in entry.arrays.items():
            n = math.prod(shape)
            # np.array copies out of the mapping: tensors must be writable and must not pin the file.
            out[name] = torch.from_numpy(np.array(self._map(name, off + n)[off : off + n]).reshape(shape))
        return out

    # -- writing -----------------------------------------------------------------------------------------------

    def _writer(self, name: str) -> Any:
        w = self._writers.get(name)
        if w is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self._bin(name)
            w = open(path, "ab")  # noqa: SIM115 - kept open across put() calls, closed by close()/flush
            # Drop whatever a killed run appended after the last index flush.
            w.truncate(self._index.sizes.get(name, 0) * _ITEM_BYTES)
            w.seek(0, os.SEEK_END)
            self._writers[name] = w
        return w

    def put(self, path: str | os.PathLike[str], arrays: dict[str, np.ndarray | Tensor]) -> str:
        """Append the arrays of input ``path`` (stored as float16); visible to readers after :meth:`flush`.

        Takes the writer lock if this cache does not hold it yet (see :meth:`writing`).
        """
        source, _, _ = file_identity(path)
        key = self.key_for(path)
        entry = _Entry(source, {})
        stored = {}
        for name, value in arrays.items():
            arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            arr = np.ascontiguousarray(arr, dtype=STORE_DTYPE)
            if not np.isfinite(arr).all():
                raise FeatureCacheError(f"{source}: non-finite features (overflow in float16?); not cached")
            stored[name] = arr
        self._ensure_lock()
        for name, arr in stored.items():
            w = self._writer(name)
            offset = self._index.sizes.get(name, 0)
            w.write(arr.tobytes())
            self._index.sizes[name] = offset + arr.size
            entry.arrays[name] = (offset, tuple(arr.shape))
        old = self._by_source.get(source)
        if old is not None and old != key:
            del self._index.items[old]  # the file changed: its old features are stale (space is not reclaimed)
        self._index.items[key] = entry
        self._by_source[source] = key
        self._pending += 1
        return key

    def flush(self) -> None:
        """Make appended items durable and visible: fsync the data files, then replace the index atomically.

        Takes the writer lock if this cache does not hold it yet (see :meth:`writing`).
        """
        self._ensure_lock()
        for w in self._writers.values():
            w.flush()
            os.fsync(w.fileno())
        self.folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.folder)
        ix = self._index
        data = {
            "format": CACHE_FORMAT,
            "tower_key": self.tower_key,
            "options": ix.options.to_json(),
            "meta": ix.meta,
            "sizes": ix.sizes,
            "items": {
                k: {"source": e.source, "arrays": {n: [off, list(s)] for n, (off, s) in e.arrays.items()}}
                for k, e in ix.items.items()
            },
        }
        write_text_atomic(self.index_path, json.dumps(data, separators=(",", ":")))
        self._pending = 0
        self._last_flush = time.monotonic()

    def maybe_flush(self, every: int, interval: float) -> None:
        """:meth:`flush` when ``every`` items are pending and ``interval`` seconds passed since the last one."""
        if self._pending >= every and time.monotonic() - self._last_flush >= interval:
            self.flush()

    def _close_writers(self) -> None:
        try:
            if self._pending or (self._lock_handle is not None and not self.index_path.exists()):
                self.flush()
        finally:
            for w in self._writers.values():
                w.close()
            self._writers.clear()
            self._maps.clear()

    def close(self) -> None:
        """Flush pending items, close the data files, and release the writer lock taken by :meth:`put`."""
        try:
            self._close_writers()
        finally:
            if self._lazy_lock:
                self._lazy_lock = False
                self._release_lock()


# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------


def _input_paths(inputs: Iterable[Record | str | os.PathLike[str]], kind: Kind) -> list[str]:
    paths: list[str] = []
    seen: set[str] = set()
    for x in inputs:
        p = (x.audio if kind == "speech" else x.image) if isinstance(x, Record) else os.fspath(x)
        p = os.path.abspath(p)
        if p not in seen:  # an image has several captions: extract it once
            seen.add(p)
            paths.append(p)
    return paths


def _resolve_layers(layers: tuple[int, ...] | None, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    out = []
    for i in layers:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ConfigError(f"layer {i} out of range: the tower has {n} hidden states")
        out.append(j)
    return out


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _speech_batch(
    cache: FeatureCache, tower: nn.Module, paths: list[str], device: torch.device, precision: str | None = None
) -> list[dict[str, np.ndarray]]:
    """Run the speech tower on ``paths`` at ``precision`` (``None``: the cache's) -> arrays to store."""
    from vgskit.audio import load_audio

    opts = cache.options
    rate = int(getattr(getattr(tower, "preprocessing", None), "sample_rate", 16000))
    wavs = []
    for p in paths:
        w = load_audio(p, sample_rate=rate)
        wavs.append(w if opts.max_seconds is None else w[: int(round(opts.max_seconds * rate))])
    lengths = torch.tensor([len(w) for w in wavs], dtype=torch.long)
    batch = torch.zeros(len(wavs), int(lengths.max()), dtype=torch.float32)
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = torch.from_numpy(w)
    with autocast(precision or opts.precision, device):
        out: SpeechEncoderOutput = tower(batch.to(device), lengths.to(device))
    states = out.hidden_states if out.hidden_states is not None else (out.last_hidden_state,)
    layers = _resolve_layers(opts.layers, len(states))
    cache.set_meta(
        {
            "kind": "speech",
            "frame_rate": float(out.frame_rate),
            "width": int(states[layers[0]].shape[-1]),
            "layers": layers,
            "num_hidden_states": len(states),
        }
    )
    if len({int(states[i].shape[-1]) for i in layers}) != 1:
        raise ConfigError("cached speech layers must share one width")
    stacked = torch.stack([states[i] for i in layers], dim=1).float()  # [B, L, T', D]
    frames = out.lengths.cpu()
    result = []
    for b in range(len(paths)):
        n = int(frames[b])
        x = stacked[b, :, :n]  # [L, T_b, D]
        result.append({"hidden": (x.mean(dim=1) if opts.pooled else x).cpu().numpy()})  # [L, D] or [L, T_b, D]
    return result


def _image_batch(
    cache: FeatureCache, tower: nn.Module, paths: list[str], device: torch.device, precision: str | None = None
) -> list[dict[str, np.ndarray]]:
    """Run the image tower on ``paths`` at ``precision`` (``None``: the cache's) -> arrays to store."""
    from vgskit.images import load_image

    transform: ImageTransform = (
        cache.options.image_transform or getattr(tower, "transform", None) or ImageTransform()
    )
    pixels = torch.stack([transform(load_image(p)) for p in paths]).to(device)  # [B, 3, S, S]
    with autocast(precision or cache.options.precision, device):
        out: ImageEncoderOutput = tower(pixels)
    pooled = out.pooled.float().cpu()  # [B, D']
    tokens = out.tokens.float().cpu()  # [B, N, D]
    meta: dict[str, Any] = {"kind": "image", "width": int(pooled.shape[-1])}
    if not cache.options.pooled:
        meta["tokens_shape"] = [int(tokens.shape[1]), int(tokens.shape[2])]
    cache.set_meta(meta)
    result = []
    for b in range(len(paths)):
        arrays = {"pooled": pooled[b].numpy()}
        if not cache.options.pooled:
            arrays["tokens"] = tokens[b].numpy()
        result.append(arrays)
    return result


def extract(
    cache: FeatureCache,
    tower: nn.Module,
    inputs: Iterable[Record | str | os.PathLike[str]],
    *,
    batch_size: int = 8,
    progress: bool = True,
    flush_every: int = 64,
    flush_interval: float = 10.0,
    device: str | torch.device | None = None,
    check_key: bool = True,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    precision: str | None = None,
) -> int:
    """Run ``tower`` on the inputs the cache lacks and store its outputs; returns how many were extracted.

    The whole extraction holds the cache folder's writer lock (see :meth:`FeatureCache.writing`): another
    process extracting into the same folder is waited for (with ``progress``, a line on stderr says so), and
    what it extracted meanwhile is not extracted again.

    Args:
        cache: target cache; its :attr:`FeatureCache.options` say what to store.
        tower: a speech tower (``(wavs, lengths) -> SpeechEncoderOutput``) or image tower
            (``pixels -> ImageEncoderOutput``), run in eval mode under ``no_grad`` (its mode is restored).
        inputs: records (their ``audio`` or ``image``) or file paths; duplicates are extracted once.
        batch_size: files per tower call. Speech towers that pad exactly (see
            :mod:`vgskit.encoders.pretrained_speech`) give the same features for any batch size.
        progress: tqdm progress bar over the missing files.
        flush_every: index flush period in items (see the module docstring on resuming).
        flush_interval: minimum seconds between two periodic flushes.
        device: where to run the tower (default: where its parameters are).
        check_key: recompute :func:`tower_key` and refuse a tower that does not match the cache.
        lock_timeout: seconds to wait for another writer of the folder before raising
            :class:`FeatureCacheError` (naming the folder and the holder's pid); ``None``: no limit.
        precision: the precision the caller wants (``"fp32"``/``"bf16"``), checked against the cache's
            ``options.precision``, which is what the tower runs at (``None``: no check). A mismatch raises
            :class:`FeatureCacheError`: features computed at one precision are never stored or reused as the
            other's.

    The tower runs under the cache's precision exactly, since the key records it. A bf16 cache on a CPU
    without native bf16 is refused (:class:`ConfigError`): the fallback to fp32 belongs before the cache is
    chosen (:func:`~vgskit.precision.resolve_precision`), so that the fp32 cache is the one extracted.
    """
    if batch_size < 1 or flush_every < 1:
        raise ConfigError(f"extract: batch_size and flush_every must be >= 1, got {batch_size}, {flush_every}")
    opts = cache.options
    if precision is not None and validate_precision(precision) != opts.precision:
        raise FeatureCacheError(
            f"feature cache {cache.folder} holds {opts.precision} features, not {precision}; open the "
            f"{precision} cache with FeatureCache.for_tower(root, tower, ExtractionOptions(..., "
            f"precision={precision!r})), which lives in another folder"
        )
    if check_key:
        key = tower_key(tower, opts)
        if key != cache.tower_key:
            raise FeatureCacheError(
                f"tower does not match the feature cache {cache.folder}: its key is {key} (different config, "
                f"weights or options); open FeatureCache.for_tower(root, tower, options) instead"
            )
    paths = _input_paths(inputs, opts.kind)
    if all(p in cache for p in paths):
        return 0  # everything is in the flushed index this cache opened: nothing to write, no lock needed
    if device is None:
        first = next(iter(tower.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if opts.precision != "fp32":
        try:
            resolve_precision(opts.precision, device, strict=True)
        except ConfigError as exc:
            raise ConfigError(f"feature cache {cache.folder}: {exc} (resolve the precision with "
                              "vgskit.precision.resolve_precision before choosing the cache)") from None
    run = _speech_batch if opts.kind == "speech" else _image_batch
    with cache.writing(timeout=lock_timeout, announce=progress):
        todo = [p for p in paths if p not in cache]  # after the reload: another writer may have done them
        if not todo:
            return 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"extract {opts.kind} {cache.tower_key}", unit="file")
        was_training = tower.training
        tower.eval()
        done = 0
        try:
            with torch.no_grad():
                for chunk in _batches(todo, batch_size):
                    for p, arrays in zip(chunk, run(cache, tower, chunk, device), strict=True):
                        cache.put(p, arrays)
                        done += 1
                    cache.maybe_flush(flush_every, flush_interval)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            # Keep every finished item, also when interrupted (Ctrl-C, an unreadable file): a rerun resumes.
            # writing() flushes them on exit, before the lock is released.
            tower.train(was_training)
            if bar is not None:
                bar.close()
    return done


# ---------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------

# How far a recomputed value may be from the stored one. Stored s = fp16(x), x the float32 output at
# extraction. Float16 keeps 11 significant bits, so round-to-nearest moves a normal value by at most 2**-11
# of its magnitude (half a unit in the last place) and a subnormal one (below 2**-14) by at most 2**-25;
# seen from the stored side, |x| <= |s| (1 + 2**-10), hence |x - s| <= 2**-11 (1 + 2**-10) |s| + 2**-25.
# The recomputation y is not bit-identical to x either: another batch composition (padding), device, thread
# count or kernel (cuDNN convolutions use TF32 by default, float32 sums change with their order) moves the
# float32 outputs by up to about 1e-3 of the activations' scale after a deep tower. Part of that error is
# multiplicative (it scales with the value) and part comes from sums over the other elements (it scales with
# the typical activation, not this one), so the default allowance is KERNEL_RTOL * (|s| + rms(s)) with the
# RMS taken over the item's array, ten times the expected variation. Items that hold another item's
# features, garbage, NaN or inf differ by about rms(s) at most of their values and are far outside it; so is a
# corrupted sign, exponent or high mantissa byte. A flip of one of the lowest mantissa bits (< 1 % of a value)
# can pass: that is below what kernel variation alone can produce.
FP16_RTOL = 2.0**-11 * (1.0 + 2.0**-10)
FP16_ATOL = 2.0**-25
KERNEL_RTOL = 1e-2
# With bf16 on either side (a bf16 cache, or a recomputation at another precision than the cache's), every
# matrix product rounds its inputs to 8 significant bits (relative step 2**-8 ~ 0.4 %); another batch
# composition or kernel flips some of those roundings, and the changes add up over a deep tower, so bf16
# outputs move by a few percent of the activations' scale between runs and from the fp32 ones. Five times the
# fp32 allowance still leaves another item's features (off by about rms(s)) far outside it.
BF16_KERNEL_RTOL = 5e-2
_SHOWN = 20  # problems, mismatches and skipped items listed by VerifyReport.format


@dataclass
class CacheMismatch:
    """One stored array that does not match the tower's recomputation of its input file."""

    key: str
    source: str
    array: str
    data_file: str
    max_abs_diff: float
    bad_values: int
    values: int
    detail: str = ""

    def describe(self) -> str:
        """One line naming the input file, the data file and how far off the stored values are."""
        what = self.detail or f"{self.bad_values} of {self.values} values outside the tolerance"
        return f"{self.source}: {self.array!r} in {self.data_file}: max abs diff {self.max_abs_diff:.4g} ({what})"


@dataclass
class VerifyReport:
    """What :func:`check_cache_structure` / :func:`verify_cache` found in one cache folder.

    ``problems`` are structural (the index against the data files), ``mismatches`` are stored values that
    differ from a recomputation, ``skipped`` are items that could not be recomputed (their input file is
    missing or changed since extraction: the cache no longer serves them), ``notes`` are harmless findings.
    """

    folder: str
    tower_key: str
    kind: str | None = None
    items: int = 0
    recomputed: bool = False
    checked: int = 0
    checked_sources: list[str] = field(default_factory=list)
    mismatches: list[CacheMismatch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No structural problem and no mismatch."""
        return not self.problems and not self.mismatches

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (with ``ok``)."""
        return {**dataclasses.asdict(self), "ok": self.ok}

    def format(self) -> str:
        """A human-readable summary, ending with ``result: OK`` or ``result: PROBLEMS FOUND``."""

        def listed(lines: Sequence[str]) -> list[str]:
            more = [f"    ... and {len(lines) - _SHOWN} more"] if len(lines) > _SHOWN else []
            return [f"    - {line}" for line in lines[:_SHOWN]] + more

        out = [f"feature cache {self.folder}",
               f"  tower key {self.tower_key}, {self.kind or 'unknown'} features, {self.items} items"]
        if self.problems:
            out += [f"  structure: {len(self.problems)} problem(s)", *listed(self.problems)]
        else:
            out.append("  structure: OK (index entries lie inside complete data files, no two share bytes)")
        if not self.recomputed:
            out.append("  values: not recomputed (give the tower, e.g. --model NAME_OR_CHECKPOINT)")
        elif self.mismatches:
            out += [f"  values: {len(self.mismatches)} of {self.checked} recomputed items do not match",
                    *listed([m.describe() for m in self.mismatches])]
        else:
            out.append(f"  values: {self.checked} of {self.items} items recomputed, all match")
        if self.skipped:
            out += [f"  skipped: {len(self.skipped)} item(s) not recomputed", *listed(self.skipped)]
        out += [f"  note: {n}" for n in self.notes]
        out.append(f"  result: {'OK' if self.ok else 'PROBLEMS FOUND'}")
        return "\n".join(out)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _expected_arrays(options: ExtractionOptions, meta: dict[str, Any]) -> dict[str, tuple[int | None, ...]]:
    """Array name -> expected shape (``None``: any size) from the options and the recorded metadata."""
    width = meta.get("width")
    if options.kind == "speech":
        layers = len(meta["layers"]) if isinstance(meta.get("layers"), list) else None
        return {"hidden": (layers, width) if options.pooled else (layers, None, width)}
    shapes: dict[str, tuple[int | None, ...]] = {"pooled": (width,)}
    if not options.pooled:
        tok = meta.get("tokens_shape")
        shapes["tokens"] = tuple(tok) if isinstance(tok, list) else (None, None)
    return shapes


def check_cache_structure(folder: str | os.PathLike[str]) -> VerifyReport:
    """Check one cache folder (``root/<tower_key>``) without a tower: the index against the data files.

    Every index entry must lie inside the data its ``.bin`` file holds, no two entries may share values
    (appends never reuse space, so overlaps are corruption), shapes must agree with the recorded metadata,
    and no input file may be listed twice. Raises :class:`FeatureCacheError` if ``folder`` has no index.
    """
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        raise FeatureCacheError(f"{folder}: not a feature cache (no {INDEX_NAME})")
    report = VerifyReport(str(folder), folder.name)
    problems = report.problems
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"{index_path}: unreadable ({exc.strerror or exc})")
        return report
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{index_path}: corrupt or truncated JSON ({exc})")
        return report
    if not isinstance(data, dict):
        problems.append(f"{index_path}: not a JSON object")
        return report
    if data.get("format") != CACHE_FORMAT:
        why = (" (written without the writer lock: concurrent trainings may have corrupted it, so this version "
               "does not reuse it; delete the folder)") if data.get("format") == 1 else ""
        problems.append(f"{index_path}: format {data.get('format')!r}, this version reads format {CACHE_FORMAT}{why}")
        return report
    if data.get("tower_key") != folder.name:
        problems.append(f"{index_path}: written for tower key {data.get('tower_key')!r}, but lies in {folder.name!r}")
    try:
        options: ExtractionOptions | None = ExtractionOptions.from_json(data["options"])
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        problems.append(f"{index_path}: malformed options ({type(exc).__name__}: {exc})")
        options = None
    report.kind = None if options is None else options.kind
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        problems.append(f"{index_path}: malformed meta (not an object)")
        meta = {}
    raw_sizes, items = data.get("sizes"), data.get("items")
    try:
        if not isinstance(raw_sizes, dict) or not isinstance(items, dict):
            raise TypeError("'sizes' and 'items' must be objects")
        sizes = {str(k): _int(v) for k, v in raw_sizes.items()}
        if any(v < 0 for v in sizes.values()):
            raise ValueError("negative size")
    except (TypeError, ValueError) as exc:
        problems.append(f"{index_path}: malformed sizes/items ({exc})")
        return report
    report.items = len(items)

    for name, n in sorted(sizes.items()):
        path = folder / f"{name}.bin"
        need = n * _ITEM_BYTES
        have = path.stat().st_size if path.is_file() else None
        if have is None:
            if need:
                problems.append(f"{path}: missing (the index records {n} values in it)")
        elif have < need:
            problems.append(f"{path}: truncated ({have} bytes, the index expects {need})")
        elif have > need:
            report.notes.append(f"{path}: {have - need} bytes after the indexed data (left by an interrupted "
                                "extraction; the next one cuts them off)")
    for path in sorted(folder.glob("*.bin")):
        if path.stem not in sizes:
            report.notes.append(f"{path}: not referenced by the index")

    expected = _expected_arrays(options, meta) if options is not None else None
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    sources: dict[str, str] = {}
    for key, raw in items.items():
        if not isinstance(raw, dict) or not isinstance(raw.get("source"), str) or not isinstance(
                raw.get("arrays"), dict):
            problems.append(f"{index_path}: item {key}: malformed (needs 'source' and 'arrays')")
            continue
        source = raw["source"]
        where = f"item {key} ({source})"
        if source in sources:
            problems.append(f"{index_path}: {source} is listed twice (items {sources[source]} and {key})")
        sources[source] = key
        if expected is not None and set(raw["arrays"]) != set(expected):
            problems.append(f"{where}: arrays {sorted(raw['arrays'])}, a {report.kind} cache with these options "
                            f"holds {sorted(expected)}")
        for name, spec in raw["arrays"].items():
            try:
                off, shape = spec
                off, shape = _int(off), tuple(_int(d) for d in shape)
                if off < 0 or any(d < 0 for d in shape):
                    raise ValueError("negative offset or dimension")
            except (TypeError, ValueError) as exc:
                problems.append(f"{where}: array {name!r}: malformed offset/shape {spec!r} ({exc})")
                continue
            n = math.prod(shape)
            if name not in sizes:
                problems.append(f"{where}: array {name!r} has no data file in the index")
            elif off + n > sizes[name]:
                problems.append(f"{where}: {name}.bin values [{off}, {off + n}) lie outside the "
                                f"{sizes[name]} values the index records")
            else:
                ranges.setdefault(name, []).append((off, off + n, key))
            want = None if expected is None else expected.get(name)
            if want is not None and (len(want) != len(shape) or any(w is not None and w != d
                                                                    for w, d in zip(want, shape, strict=True))):
                shown = [("?" if w is None else w) for w in want]
                problems.append(f"{where}: array {name!r} has shape {list(shape)}, the cache's metadata says {shown}")
    for name, spans in sorted(ranges.items()):
        spans.sort()
        end_so_far, owner = 0, ""
        for start, end, key in spans:
            if start < end_so_far:
                problems.append(f"{folder / (name + '.bin')}: items {owner} and {key} share values "
                                f"[{start}, {min(end, end_so_far)})")
            if end > end_so_far:
                end_so_far, owner = end, key

    tower_file = folder / TOWER_NAME
    if not tower_file.is_file():
        report.notes.append(f"{tower_file}: missing (only says what the folder holds; nothing reads it)")
    info = lock_holder(folder / LOCK_NAME)
    if info is not None:
        who = f"pid {info['pid']} on host {info.get('host', '?')}" if "pid" in info else "another process"
        report.notes.append(f"{who} is writing this cache now; checked its last flushed state")
    return report


def _compare(stored: Tensor, fresh: np.ndarray, atol: float | None,
             rtol: float = KERNEL_RTOL) -> tuple[float, int, str]:
    """``(max abs diff, values outside the tolerance, detail)`` of one stored array and its recomputation.

    ``rtol`` is the kernel allowance used when ``atol`` is None (``BF16_KERNEL_RTOL`` when bf16 is involved).
    """
    s = stored.double().numpy()
    if s.shape != fresh.shape:
        return math.inf, int(s.size), f"stored shape {list(s.shape)}, recomputed {list(fresh.shape)}"
    y = fresh.astype(np.float64)
    finite = np.isfinite(s)
    if not finite.all():
        return math.inf, int((~finite).sum()), f"{int((~finite).sum())} stored values are NaN or infinite"
    diff = np.abs(y - s)
    scale = np.abs(s)
    if atol is None:
        rms = float(np.sqrt(np.mean(s * s))) if s.size else 0.0
        kernel = rtol * (scale + rms)
    else:
        kernel = atol
    tol = FP16_RTOL * scale + FP16_ATOL + kernel
    bad = ~(diff <= tol)  # NaN in the recomputation counts as bad
    return (float(diff.max()) if diff.size else 0.0), int(bad.sum()), ""


def verify_cache(
    cache: FeatureCache,
    tower: nn.Module,
    inputs: Iterable[Record | str | os.PathLike[str]] | None = None,
    *,
    sample: int | None = 16,
    seed: int = 0,
    atol: float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    check_key: bool = True,
    precision: str | None = None,
) -> VerifyReport:
    """Check ``cache``'s structure, then recompute a seeded random sample of its items with ``tower``.

    Args:
        cache: the cache to check (its flushed index as opened; the structure is read afresh from disk).
        tower: the tower that built it (its :func:`tower_key` under the cache's options must be the cache's
            key, else :class:`FeatureCacheError`, unless ``check_key`` is false).
        inputs: records or paths to draw the sample from (``None``: every item in the index).
        sample: how many items to recompute (``None``: all of them).
        seed: seed of the sample, so that a report can be reproduced.
        atol: absolute allowance for the tower's own variation between two runs (``None``: derived from
            the values, see ``KERNEL_RTOL``); fp16 rounding of the stored values is always allowed on top.
        batch_size: files per tower call.
        device: where to run the tower (default: where its parameters are).
        check_key: refuse a tower whose key is not the cache's.
        precision: the precision to recompute at (``None``: the cache's own, recorded in its options). With
            bf16 on either side the allowance is ``BF16_KERNEL_RTOL`` instead of ``KERNEL_RTOL``.

    Items whose input file is missing or changed since extraction (the cache no longer serves them) are
    listed as skipped, not as mismatches.
    """
    if sample is not None and sample < 0:
        raise ConfigError(f"verify_cache: sample must be >= 0 or None, got {sample}")
    if batch_size < 1:
        raise ConfigError(f"verify_cache: batch_size must be >= 1, got {batch_size}")
    if atol is not None and not atol >= 0:
        raise ConfigError(f"verify_cache: atol must be >= 0 or None, got {atol}")
    opts = cache.options
    recompute_at = opts.precision if precision is None else validate_precision(precision)
    rtol = KERNEL_RTOL if recompute_at == opts.precision == "fp32" else BF16_KERNEL_RTOL
    if check_key:
        key = tower_key(tower, opts)
        if key != cache.tower_key:
            raise FeatureCacheError(
                f"tower does not match the feature cache {cache.folder}: under the cache's options its key is "
                f"{key}, the cache's is {cache.tower_key} (different class, config or weights)"
            )
    report = check_cache_structure(cache.folder)
    report.recomputed = True
    if recompute_at != opts.precision:
        report.notes.append(f"recomputed at {recompute_at}, the cache holds {opts.precision} features "
                            f"(allowance {rtol:g} of each value plus the item's RMS)")
    entries = cache._index.items
    candidates: list[str] = []
    if inputs is None:
        for k in sorted(entries):
            source = entries[k].source
            try:
                now = cache.key_for(source)
            except FeatureCacheError:
                report.skipped.append(f"{source}: missing")
                continue
            if now != k:
                report.skipped.append(f"{source}: changed since extraction")
            else:
                candidates.append(k)
    else:
        for p in _input_paths(inputs, opts.kind):
            try:
                k = cache.key_for(p)
            except FeatureCacheError:
                report.skipped.append(f"{p}: missing")
                continue
            if k in entries:
                candidates.append(k)
            else:
                report.skipped.append(f"{p}: not in the cache (new, or changed since extraction)")
    if sample is not None and sample < len(candidates):
        candidates = sorted(random.Random(seed).sample(candidates, sample))
    if device is None:
        first = next(iter(tower.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    run = _speech_batch if opts.kind == "speech" else _image_batch
    was_training = tower.training
    tower.eval()
    try:
        with torch.no_grad():
            for chunk in _batches(candidates, batch_size):
                paths = [entries[k].source for k in chunk]
                try:
                    fresh: list[dict[str, np.ndarray] | None] = list(run(cache, tower, paths, device,
                                                                          recompute_at))
                except FeatureCacheError as exc:  # the tower's metadata contradicts the cache's
                    report.problems.append(f"recomputing {paths[0]}: {exc}")
                    break
                except VGSKitError:  # an input that cannot be read now: find which, check the others
                    fresh = []
                    for path in paths:
                        try:
                            fresh.append(run(cache, tower, [path], device, recompute_at)[0])
                        except FeatureCacheError:
                            raise
                        except VGSKitError as exc:
                            report.skipped.append(f"{path}: cannot be read now ({exc})")
                            fresh.append(None)
                for k, path, arrays in zip(chunk, paths, fresh, strict=True):
                    if arrays is None:
                        continue
                    stored = cache.get(k)
                    report.checked += 1
                    report.checked_sources.append(path)
                    for name in sorted(set(stored) | set(arrays)):
                        if name not in stored or name not in arrays:
                            detail = "not stored" if name in arrays else "the tower does not produce it"
                            report.mismatches.append(
                                CacheMismatch(k, path, name, str(cache._bin(name)), math.inf, 0, 0, detail))
                            continue
                        diff, bad, detail = _compare(stored[name], np.asarray(arrays[name]), atol, rtol)
                        if bad:
                            report.mismatches.append(CacheMismatch(
                                k, path, name, str(cache._bin(name)), diff, bad, int(stored[name].numel()), detail))
    finally:
        tower.train(was_training)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Training from the cache
# ---------------------------------------------------------------------------------------------------------------


def _check_complete(cache: FeatureCache, paths: Sequence[str]) -> list[str]:
    keys, missing = [], []
    for p in paths:
        k = cache.key_for(p)
        keys.append(k)
        if not cache.has_key(k):
            missing.append(p)
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FeatureCacheError(
            f"feature cache {cache.folder} lacks {len(missing)} of {len(paths)} files (new or changed since "
            f"extraction); run extract() first:\n  {shown}{more}"
        )
    return keys


class CachedSpokenCaptionDataset(Dataset):
    """A :class:`~vgskit.data.loader.SpokenCaptionDataset` whose frozen towers' outputs come from caches.

    With ``speech_cache`` an item's ``states`` are the cached ``[L, T', D]`` (or ``[L, D]`` pooled) float16
    hidden states and ``length`` their frame count (waveforms are not read at all); with ``image_cache``,
    ``tower_outputs`` is the image's cached arrays flattened into one float16 vector.
    :func:`collate_cached_captions` batches them as ``tower_states`` / ``tower_outputs`` inputs. Pair it with
    :class:`CachedSpeechEncoder` / :class:`CachedImageEncoder` as the model's towers.

    Every file is checked against the cache up front (stat only), so a stale cache fails here, not mid-epoch.
    """

    def __init__(self, base: Any, speech_cache: FeatureCache | None = None, image_cache: FeatureCache | None = None):
        if speech_cache is None and image_cache is None:
            raise ConfigError("CachedSpokenCaptionDataset: give a speech_cache, an image_cache or both")
        self.base = base
        self.speech_cache = speech_cache
        self.image_cache = image_cache
        self.records = base.records
        self.image_keys = base.image_keys
        self.caption_image_index = base.caption_image_index
        self.speech_keys: list[str] | None = None
        self.image_cache_keys: list[str] | None = None
        if speech_cache is not None:
            opts = speech_cache.options
            if opts.kind != "speech":
                raise ConfigError(f"speech_cache {speech_cache.folder} holds {opts.kind} features")
            if getattr(base, "crop", "head") != "head":
                raise ConfigError(
                    f"speech cache {speech_cache.folder}: the dataset crops a random window every epoch, which "
                    "a cache of the tower's outputs cannot reproduce (the tower sees the whole window); "
                    "use crop='head' or the live speech tower"
                )
            want = None if opts.max_seconds is None else int(round(opts.max_seconds * base.sample_rate))
            if want != base.max_samples:
                raise ConfigError(
                    f"speech cache crops to max_seconds={opts.max_seconds}, the dataset to "
                    f"{None if base.max_samples is None else base.max_samples / base.sample_rate} s"
                )
            self.speech_keys = _check_complete(speech_cache, [r.audio for r in self.records])
        if image_cache is not None:
            if image_cache.options.kind != "image":
                raise ConfigError(f"image_cache {image_cache.folder} holds {image_cache.options.kind} features")
            self.image_cache_keys = _check_complete(image_cache, list(base.image_paths))

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Forwarded to the base dataset (its random crops, when speech is read live)."""
        set_epoch = getattr(self.base, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch, seed)

    def num_frames(self) -> list[int]:
        """Cached frames per caption (for length bucketing; 1 for pooled features)."""
        if self.speech_cache is None or self.speech_keys is None:
            return list(self.base.num_samples())
        pooled = self.speech_cache.options.pooled
        return [1 if pooled else self.speech_cache.shapes(k)["hidden"][1] for k in self.speech_keys]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index = self.caption_image_index[index]
        item: dict[str, Any] = {"image_index": image_index, "caption_index": index}
        if self.speech_cache is not None and self.speech_keys is not None:
            states = self.speech_cache.get(self.speech_keys[index])["hidden"]  # [L, T', D] or pooled [L, D]
            item.update(states=states, length=1 if states.dim() == 2 else int(states.shape[1]),
                        frame_rate=float(self.speech_cache.meta.get("frame_rate", 50.0)))
        else:
            wav = self.base.waveform(index)
            item.update(wav=wav, length=int(wav.shape[0]))
        if self.image_cache is not None and self.image_cache_keys is not None:
            arrays = self.image_cache.get(self.image_cache_keys[image_index])
            # tokens first, then pooled: the order CachedImageEncoder unpacks.
            item["tower_outputs"] = torch.cat([arrays[n].reshape(-1) for n in ("tokens", "pooled") if n in arrays])
        else:
            item["pixels"] = self.base.pixels(image_index)
        return item


def collate_cached_captions(items: Sequence[dict[str, Any]]) -> Batch:
    """Batch :class:`CachedSpokenCaptionDataset` items into a :class:`~vgskit.contract.Batch`.

    Cached speech states ``[L, T_b, D]`` are zero-padded to ``SpeechInputs("tower_states")`` with values
    ``[B, L, T, D]`` (float16) and ``lengths [B]`` in frames; pooled ones stack to ``[B, L, D]``. Without a
    speech cache the waveforms are batched as :func:`~vgskit.data.loader.collate_spoken_captions` does.
    Cached image vectors become ``ImageInputs("tower_outputs")``.
    """
    if not items:
        raise ConfigError("collate_cached_captions: empty batch")
    from vgskit.data.loader import collate_spoken_captions, make_batch

    if "states" not in items[0]:
        return collate_spoken_captions(items)
    first = items[0]["states"]
    lengths = torch.tensor([int(it["length"]) for it in items], dtype=torch.long)
    if first.dim() == 2:  # pooled: [L, D]
        states = torch.stack([it["states"] for it in items])
    else:
        L, _, D = first.shape
        states = torch.zeros(len(items), L, int(lengths.max()), D, dtype=first.dtype)
        for row, it in enumerate(items):
            states[row, :, : it["length"]] = it["states"]
    frame_rate = float(items[0].get("frame_rate", 50.0))
    return make_batch(SpeechInputs("tower_states", states, lengths, frame_rate), items)


class _StandIn(nn.Module):
    """Base of the cache readers: optionally saves and loads as the frozen tower it replaces.

    Given ``tower``, the reader keeps a reference to it (not registered as a submodule: it is not part of
    the forward pass, and training code that moves or wraps the model should not see it) and

    * its ``state_dict`` is the tower's, under the reader's own prefix, so a model whose tower was swapped
      for a reader still saves exactly the state dict of the model with the real tower (a checkpoint
      written while training from a cache loads with ``load_pretrained`` into the real model);
    * ``load_state_dict`` hands those entries to the tower (resuming from such a checkpoint), and
    * attributes the reader lacks are looked up on the tower (``preprocessing``, ``hf_config``, ...), for
      model code that reads its tower's settings.
    """

    def _stand_in_for(self, tower: nn.Module | None) -> None:
        self._tower_ref: tuple[nn.Module, ...] = () if tower is None else (tower,)
        if tower is None:
            return
        post = getattr(self, "register_state_dict_post_hook", None)  # public since torch 2.5
        (post or self._register_state_dict_hook)(_StandIn._add_tower_state)
        self.register_load_state_dict_pre_hook(_StandIn._take_tower_state)

    @property
    def tower(self) -> nn.Module | None:
        """The frozen tower this reader stands in for (``None`` if not given)."""
        return self._tower_ref[0] if self._tower_ref else None

    @staticmethod
    def _add_tower_state(module: _StandIn, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        tower = module.tower
        if tower is not None:
            for name, value in tower.state_dict().items():
                state_dict[prefix + name] = value

    @staticmethod
    def _take_tower_state(
        module: _StandIn, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        tower = module.tower
        if tower is None:
            return
        own = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
        result = tower.load_state_dict(own, strict=False)
        missing_keys.extend(prefix + k for k in result.missing_keys)
        unexpected_keys.extend(prefix + k for k in result.unexpected_keys)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            refs = self.__dict__.get("_tower_ref", ())
            if refs and not name.startswith("_"):
                return getattr(refs[0], name)
            raise


class CachedSpeechEncoder(_StandIn):
    """Stand-in for a frozen speech tower: turns cached features back into a :class:`SpeechEncoderOutput`.

    ``forward(wavs, lengths)`` takes the ``wavs [B, L, T', D]`` / ``lengths [B]`` (frames) that
    :func:`collate_cached_captions` builds and returns ``hidden_states`` = the ``L`` cached layers (float32,
    padding zeroed) and ``last_hidden_state`` = the last cached layer. Pooled caches (``[B, L, D]``) come back
    as one frame per utterance. It has no parameters; :attr:`width`, :attr:`frame_rate` and
    :attr:`num_hidden_states` mirror the tower's, for building heads. With ``tower`` (the frozen tower it
    replaces) it saves and loads as that tower (see :class:`_StandIn`).
    """

    def __init__(self, cache: FeatureCache, dtype: torch.dtype = torch.float32, tower: nn.Module | None = None):
        super().__init__()
        self._stand_in_for(tower)
        meta = cache.meta
        if cache.options.kind != "speech" or "width" not in meta:
            raise FeatureCacheError(f"{cache.index_path}: not a speech feature cache with extracted items")
        self.width = int(meta["width"])
        self.frame_rate = float(meta["frame_rate"])
        self.layers = list(meta["layers"])
        self.num_hidden_states = len(self.layers)
        self.pooled = cache.options.pooled
        self.dtype = dtype

    def forward(self, wavs: Tensor, lengths: Tensor) -> SpeechEncoderOutput:
        """Unpack cached features ``[B, L, T', D]`` (or pooled ``[B, L, D]``)."""
        x = wavs.to(self.dtype)
        if x.dim() == 3:  # pooled: one "frame" per utterance
            x = x.unsqueeze(2)
            lengths = torch.ones_like(lengths)
        if x.dim() != 4 or x.shape[1] != self.num_hidden_states or x.shape[-1] != self.width:
            raise ConfigError(
                f"CachedSpeechEncoder expects cached features [B, {self.num_hidden_states}, T, {self.width}], "
                f"got {tuple(wavs.shape)} (were raw waveforms passed?)"
            )
        # Collated batches are zero-padded already; re-zero anyway for batches built elsewhere, in place on
        # the converted copy (a separate multiply would cost another full pass over the batch).
        pad = ~lengths_to_mask(lengths.to(x.device), x.shape[2])[:, None, :, None]  # [B, 1, T', 1]
        x = x.masked_fill_(pad, 0.0) if x.data_ptr() != wavs.data_ptr() else x.masked_fill(pad, 0.0)
        states = tuple(x.unbind(dim=1))  # L × [B, T', D]
        return SpeechEncoderOutput(
            last_hidden_state=states[-1], lengths=lengths, frame_rate=self.frame_rate, hidden_states=states
        )


class CachedImageEncoder(_StandIn):
    """Stand-in for a frozen image tower: unpacks the flat cached vectors of :class:`CachedSpokenCaptionDataset`.

    Returns an :class:`ImageEncoderOutput` with the cached ``tokens [B, N, D]`` and ``pooled [B, D']``; for a
    pooled-only cache, ``tokens`` is the pooled vector as one token. With ``tower`` it saves and loads as
    that tower (see :class:`_StandIn`).
    """

    def __init__(self, cache: FeatureCache, dtype: torch.dtype = torch.float32, tower: nn.Module | None = None):
        super().__init__()
        self._stand_in_for(tower)
        meta = cache.meta
        if cache.options.kind != "image" or "width" not in meta:
            raise FeatureCacheError(f"{cache.index_path}: not an image feature cache with extracted items")
        self.width = int(meta["width"])
        self.tokens_shape = tuple(meta["tokens_shape"]) if "tokens_shape" in meta else None
        self.dtype = dtype

    def forward(self, pixels: Tensor) -> ImageEncoderOutput:
        """Split flat cached vectors ``[B, N*D + D']`` into tokens and pooled vector."""
        x = pixels.to(self.dtype)
        n_tok = 0 if self.tokens_shape is None else self.tokens_shape[0] * self.tokens_shape[1]
        if x.dim() != 2 or x.shape[1] != n_tok + self.width:
            raise ConfigError(
                f"CachedImageEncoder expects cached vectors [B, {n_tok + self.width}], got {tuple(pixels.shape)}"
            )
        pooled = x[:, n_tok:]
        if self.tokens_shape is None:
            return ImageEncoderOutput(tokens=pooled.unsqueeze(1), pooled=pooled)
        return ImageEncoderOutput(tokens=x[:, :n_tok].reshape(-1, *self.tokens_shape), pooled=pooled)



class CachedTowers:
    """Swaps a model's frozen towers for cache readers, and back.

    ``model`` follows the frozen-tower contract of :class:`~vgskit.models.base.RetrievalModel`:
    ``frozen_towers() -> {kind: tower}`` and ``set_tower(kind, module)``. ``caches`` maps the kinds to
    serve from a cache (``"speech"``, ``"image"``) to their :class:`FeatureCache`.

    While the readers are in place the model's state dict is still that of the real model (the readers
    save and load as their towers), so checkpoints written during training load into the real model; the
    real towers are kept aside for :meth:`real_towers`, under which validation runs on raw inputs.
    """

    def __init__(self, model: nn.Module, caches: dict[str, FeatureCache]):
        towers = dict(model.frozen_towers())  # type: ignore[operator]
        missing = sorted(set(caches) - set(towers))
        if missing:
            raise ConfigError(f"{type(model).__name__} has no frozen {', '.join(missing)} tower to serve from a cache")
        self.model = model
        self.real: dict[str, nn.Module] = {kind: towers[kind] for kind in caches}
        self.readers: dict[str, nn.Module] = {}
        for kind, cache in caches.items():
            reader_cls = CachedSpeechEncoder if kind == "speech" else CachedImageEncoder
            if kind not in ("speech", "image"):
                raise ConfigError(f"unknown tower kind {kind!r}; feature caches serve 'speech' and 'image' towers")
            self.readers[kind] = reader_cls(cache, tower=self.real[kind])
        self.active = False

    def use_cache(self) -> None:
        """Put the cache readers in place of the real towers."""
        for kind, reader in self.readers.items():
            self.model.set_tower(kind, reader)
        self.active = True

    def use_real(self) -> None:
        """Put the real towers back, on the device and in the train/eval mode of the model."""
        device = next((p.device for p in self.model.parameters()), None)
        for kind, tower in self.real.items():
            tower = tower if device is None else tower.to(device)
            tower.train(self.model.training)  # it missed the model's train()/eval() calls while aside
            self.model.set_tower(kind, tower)
        self.active = False

    @contextmanager
    def real_towers(self) -> Iterator[nn.Module]:
        """Run a block (validation) with the real towers, then restore whichever towers were in place."""
        was_active = self.active
        self.use_real()
        try:
            yield self.model
        finally:
            if was_active:
                self.use_cache()
