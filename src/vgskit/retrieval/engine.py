"""SearchEngine: spoken-query image search, image → spoken-caption search, exact or approximate, over a model.

Give the engine a model and a gallery, then ask with audio files, waveforms, embeddings or images. An index is
written once (``vgskit index``, :meth:`SearchEngine.save`) and served many times (``vgskit search``, ``vgskit
serve``, :meth:`SearchEngine.load`), in one format for all three::

    engine = SearchEngine.build(model, image_paths, image_ids)            # index_kind="auto"
    engine.save("runs/demo/index")
    engine = SearchEngine.load("runs/demo/index", model)                  # embeddings memory-mapped
    hits = engine.search_by_audio("query.wav", k=5)
    captions = engine.search_by_image("photo.jpg", k=5)                   # when the index holds captions

**Files.** ``index.safetensors`` holds the embeddings: ``image_emb`` ``[N, D]`` float32 row-major (plus
``image_tokens``/``image_mask`` for models with a fine scorer, and ``caption_emb``/``caption_tokens``/
``caption_mask`` when the index holds spoken captions). It is a standard safetensors file, read here by
memory-mapping each tensor in place (``numpy.memmap`` at the offsets of the safetensors header): loading costs no
copy, and pages are read on first use. ``ann.faiss`` is the approximate index when there is one
(:mod:`vgskit.retrieval.ann` says how it is chosen). ``index.json`` (ids, paths, captions, the index kind with its
measured recall@10, the model's identity) records the size and SHA-256 of both, and :meth:`load` verifies them:
embeddings from one build are never served with the ids of another, whatever was interrupted. The check reads each
file once, sequentially (about 1 s per GB); the pages it reads stay in the page cache, so the memory map that
follows reads nothing from disk again while memory allows.

The model's identity is a hash of its weights and config (:func:`model_identity`); an index is only searched with
the model that built it, since another checkpoint of the same width would answer without any sign of error.
Query waveforms go through the same checks as audio files (:func:`vgskit.audio.validate_waveform`).

**Exact search** is one matrix-vector product over the contiguous gallery (``torch.mv`` reads each row once,
sequentially: the scan is bound by memory bandwidth) followed by a top-k; a batch of queries is one GEMM
(:meth:`search_batch`), optionally against a bfloat16 copy of the gallery (``gallery_dtype="bf16"``: half the
bytes, scores rounded to about 3 significant digits).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from vgskit.contract import Embeddings
from vgskit.errors import ConfigError, VGSKitError
from vgskit.fileio import fsync_dir, sha256_file, temp_path_for
from vgskit.models.base import RetrievalModel
from vgskit.precision import autocast, resolve_precision
from vgskit.retrieval import ann as ann_mod

# 2: index.json records the embeddings file's size and SHA-256 and the identity of the model that built it.
# 3: the index kind (exact, hnsw, ivfsq, ivfpq) with its recall@10 and ``ann.faiss``; spoken captions; memory-mapped load.
INDEX_FORMAT_VERSION = 3
INDEX_JSON = "index.json"
INDEX_TENSORS = "index.safetensors"
INDEX_ANN = "ann.faiss"
_REQUIRED_FIELDS = {"format_version": int, "embed_dim": int, "count": int, "image_ids": list, "image_paths": list,
                    "model": dict, "tensors": dict, "index": dict}
# Shorter queries leave the speech encoders with no complete frame after their strided layers.
MIN_QUERY_SECONDS = 0.1
GALLERY_DTYPES = ("fp32", "bf16")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BOOL": np.bool_, "I64": np.int64,
              "I32": np.int32, "U8": np.uint8}


#: Held by the one exact scan that runs on NumPy's BLAS at a time (see SearchEngine._coarse).
_SCAN_LOCK = threading.Lock()


class SearchIndexError(VGSKitError):
    """A search index that is missing, damaged, inconsistent or built by another model."""


def model_identity(model: torch.nn.Module) -> dict[str, str]:
    """Name and fingerprint of a model: SHA-256 over its config description and every tensor of its state.

    The config part is :func:`vgskit.models.registry.model_config_dict` without the vgskit version (an upgrade
    does not change what a checkpoint computes); models outside the registry use their class and config repr.
    Tensors are hashed by name, dtype, shape and bytes, in name order, so the same checkpoint loaded anywhere
    (any device, train or eval mode) has the same identity, and any changed weight gives another.
    """
    from dataclasses import asdict

    from vgskit.models.registry import model_config_dict

    try:
        description: Any = model_config_dict(model)  # type: ignore[arg-type]
        description.pop("vgskit_version", None)
    except (ConfigError, AttributeError, TypeError):
        config = getattr(model, "config", None)
        try:
            config = asdict(config)  # type: ignore[arg-type]
        except TypeError:
            config = repr(config)
        description = {"class": f"{type(model).__module__}.{type(model).__qualname__}", "config": config}
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=repr).encode("utf-8"))
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes in place, no copy
    name = getattr(model, "model_name", None) or type(model).__name__
    return {"name": str(name), "sha256": digest.hexdigest()}


@dataclass(frozen=True)
class Hit:
    """One answer: for image search a gallery image (``path`` its file), for caption search a spoken caption
    (``path`` its audio file)."""

    rank: int
    item_id: str
    path: str
    score: float


@dataclass
class CaptionSet:
    """Spoken captions an index can hold, for image → speech search.

    ``ids`` and ``audio_paths`` name each caption; ``emb`` are their speech embeddings (pooled, plus token-level
    tensors for a model with a fine scorer); ``image_ids`` the gallery image each describes, when known.
    """

    ids: list[str]
    audio_paths: list[str]
    emb: Embeddings
    image_ids: list[str] | None = None

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids]
        self.audio_paths = [str(p) for p in self.audio_paths]
        n = len(self.ids)
        if len(self.audio_paths) != n or self.emb.pooled.shape[0] != n or (
                self.image_ids is not None and len(self.image_ids) != n):
            raise SearchIndexError(f"captions are inconsistent: {len(self.ids)} ids, {len(self.audio_paths)} audio "
                                   f"paths, {self.emb.pooled.shape[0]} embeddings")
        if len(set(self.ids)) != n:
            seen: set[str] = set()
            dup = next(c for c in self.ids if c in seen or seen.add(c))  # type: ignore[func-returns-value]
            raise SearchIndexError(f"duplicate caption id {dup!r}: caption ids must be unique")


class SearchEngine:
    """A gallery of image embeddings searched with spoken queries (and, with captions, images → speech).

    Coarse search ranks by the dot product of pooled embeddings, exactly (a scan) or through an approximate
    index (``index_kind``; :mod:`vgskit.retrieval.ann`), whose candidates are always re-scored exactly. For a
    model with a fine scorer (``has_fine_scores``) the index also keeps token-level embeddings, and a search
    with ``rerank_top=N`` re-ranks the N best coarse candidates with the model's ``score_pairs`` (FaST-VGS's
    coarse-to-fine retrieval); the hits' scores are then the fine scores.

    Args:
        index_kind: ``"auto"`` (the rule of :func:`vgskit.retrieval.ann.choose_index_kind`), ``"exact"``,
            ``"hnsw"``, ``"ivfsq"`` or ``"ivfpq"``.
        memory_budget_mb: memory the approximate index may take (the rule sizes it to fit).
        gallery_dtype: ``"fp32"``, or ``"bf16"`` to keep a bfloat16 copy of the gallery that
            :meth:`search_batch` multiplies with (half the bytes per scan; scores to ~3 digits).
        captions: spoken captions for :meth:`search_by_image`.
        tuning_queries: ``[Q, D]`` examples of the queries an approximate index will answer, to tune its search
            parameter on (see :func:`vgskit.retrieval.ann.build_ann`); by default the captions' embeddings when
            the index holds spoken captions (speech queries sit apart from image embeddings), else noisy gallery
            rows.

    Example::

        engine = SearchEngine(model, gallery_emb, ids, paths)              # exact below ~128 MiB of embeddings
        hits = engine.search_by_embedding(vec, k=10)
        scores, rows = engine.search_batch(torch.randn(64, model.embed_dim), k=10)   # one GEMM
    """

    def __init__(self, model: RetrievalModel, image_emb: torch.Tensor | Embeddings, image_ids: Sequence[str],
                 image_paths: Sequence[str], *, captions: CaptionSet | None = None, index_kind: str = "auto",
                 memory_budget_mb: float = ann_mod.DEFAULT_MEMORY_BUDGET_MB, gallery_dtype: str = "fp32",
                 ann: ann_mod.AnnIndex | None = None, index_info: dict[str, Any] | None = None,
                 progress: bool = False, precision: str = "fp32",
                 tuning_queries: torch.Tensor | np.ndarray | None = None):
        emb = image_emb if isinstance(image_emb, Embeddings) else Embeddings(image_emb.float())
        if len(image_ids) == 0 and emb.pooled.shape[0] == 0:
            raise SearchIndexError("the gallery is empty: there are no images to search")
        _check_unique(image_ids, image_paths)
        if emb.pooled.shape[0] != len(image_ids) or len(image_ids) != len(image_paths):
            raise VGSKitError(
                f"index is inconsistent: {tuple(emb.pooled.shape)} embeddings, {len(image_ids)} ids, "
                f"{len(image_paths)} paths"
            )
        embed_dim = model.embed_dim
        if emb.pooled.shape[1] != embed_dim:
            raise VGSKitError(
                f"index embeddings have dimension {emb.pooled.shape[1]} but the model embeds to {embed_dim}: "
                "the index was built with another checkpoint (rebuild it with `vgskit index`)"
            )
        if gallery_dtype not in GALLERY_DTYPES:
            raise VGSKitError(f"gallery_dtype {gallery_dtype!r} is not one of {', '.join(GALLERY_DTYPES)}")
        if captions is not None and captions.emb.pooled.shape[1] != embed_dim:
            raise SearchIndexError(f"caption embeddings have dimension {captions.emb.pooled.shape[1]}, the model "
                                   f"embeds to {embed_dim}")
        self.model = model.eval()
        # The precision queries are embedded at (vgskit.precision: bf16 falls back to fp32 where not native).
        self.precision = resolve_precision(precision, _model_device(model))
        self.gallery = emb.float_cpu()
        if not self.gallery.pooled.is_contiguous():  # the scan must be one pass over contiguous rows
            self.gallery = Embeddings(self.gallery.pooled.contiguous(), self.gallery.tokens, self.gallery.mask)
        self.image_ids = [str(i) for i in image_ids]
        self.image_paths = [str(p) for p in image_paths]
        self._row_of = {item: row for row, item in enumerate(self.image_ids)}
        self.captions = captions
        if captions is not None:
            captions.emb = captions.emb.float_cpu()
        self.gallery_dtype = gallery_dtype
        self._gallery_bf16 = self.gallery.pooled.to(torch.bfloat16) if gallery_dtype == "bf16" else None
        if ann is not None:
            self.ann: ann_mod.AnnIndex | None = ann
            self.index_info = dict(index_info or {"kind": ann.kind, "params": ann.params})
        else:
            n, d = self.gallery.pooled.shape
            try:
                choice = ann_mod.choose_index_kind(n, d, memory_budget_mb=memory_budget_mb, kind=index_kind)
            except ann_mod.AnnError as e:
                raise SearchIndexError(str(e)) from None
            if choice.kind == "exact":
                self.ann = None
                self.index_info = {"kind": "exact", "params": {}, "recall_at_10": 1.0, "reason": choice.reason}
            else:
                if progress:
                    print(f"building a {choice.kind} index over {n} x {d} ({choice.reason})", flush=True)
                try:
                    if tuning_queries is None and captions is not None:
                        tuning_queries = captions.emb.pooled
                    tq = None if tuning_queries is None else np.asarray(torch.as_tensor(tuning_queries).float())
                    self.ann, self.index_info = ann_mod.build_ann(self.gallery.pooled.numpy(), choice, queries=tq)
                except ann_mod.AnnError as e:
                    raise SearchIndexError(str(e)) from None

    @property
    def image_emb(self) -> torch.Tensor:
        """Pooled gallery embeddings ``[N, D]``."""
        return self.gallery.pooled

    @property
    def index_kind(self) -> str:
        """``"exact"``, ``"hnsw"``, ``"ivfsq"`` or ``"ivfpq"``."""
        return str(self.index_info["kind"])

    def describe(self) -> str:
        """One line on the index: kind, parameters and recall@10 against exact search."""
        info = self.index_info
        params = ", ".join(f"{k}={v}" for k, v in info.get("params", {}).items())
        text = f"{len(self.image_ids)} images x {self.image_emb.shape[1]}, index {info['kind']}"
        if params:
            text += f" ({params})"
        if info["kind"] != "exact":
            text += f", recall@10 vs exact {info.get('recall_at_10')} on {info.get('recall_queries')} sampled queries"
        if self.captions is not None:
            text += f", {len(self.captions.ids)} spoken captions"
        return text

    # -- building -----------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, image_paths: Sequence[str], image_ids: Sequence[str] | None = None,
              *, batch_size: int = 64, progress: bool = False, index_kind: str | None = None,
              memory_budget_mb: float | None = None, workers: int | None = None,
              work_dir: str | Path | None = None, gallery_dtype: str = "fp32") -> SearchEngine:
        """Embed every gallery image file once (pixel models; bad images raise an error that names the file).

        ``workers``/``work_dir``: embed in shards by a pool of processes, each shard saved to ``work_dir`` as it
        is done, so that a rerun after an interruption only embeds the missing shards
        (:func:`vgskit.retrieval.shards.embed_in_shards`). Options left ``None`` come from
        :func:`vgskit.retrieval.shards.build_options` (how ``vgskit index`` passes them), else the defaults.
        """
        from vgskit.contract import ImageInputs
        from vgskit.images import load_image
        from vgskit.models.base import image_transform_of
        from vgskit.retrieval.shards import embed_in_shards, resolve_options

        if model.image_input != "pixels":
            raise VGSKitError(f"model {getattr(model, 'model_name', None)!r} reads {model.image_input}, not image "
                              "files: build the index from a dataset (SearchEngine.build_from_dataset)")
        opts = resolve_options(index_kind=index_kind, memory_budget_mb=memory_budget_mb, workers=workers,
                               work_dir=work_dir)
        transform = image_transform_of(model)
        ids = list(image_ids) if image_ids is not None else [Path(p).stem for p in image_paths]
        if not image_paths:
            raise SearchIndexError("the gallery is empty: no image files were given")
        _check_unique(ids, image_paths, defaulted=image_ids is None)
        paths = [str(p) for p in image_paths]
        model.eval()

        forward = _forward_context(model)

        def embed(rows: range) -> Embeddings:
            batch = [transform(load_image(paths[i])) for i in rows]
            with forward():
                return model.embed_image(ImageInputs.from_pixels(torch.stack(batch))).float_cpu()

        emb = embed_in_shards(embed, len(paths), label="images", keys=ids, model=model, batch_size=batch_size,
                              options=opts, progress=progress)
        return cls(model, emb, ids, paths, index_kind=opts.index_kind, memory_budget_mb=opts.memory_budget_mb,
                   gallery_dtype=gallery_dtype, progress=progress)

    @classmethod
    @torch.no_grad()
    def build_from_dataset(cls, model: torch.nn.Module, dataset: Any, *, batch_size: int = 64,
                           progress: bool = False, captions: bool | None = None, index_kind: str | None = None,
                           memory_budget_mb: float | None = None, workers: int | None = None,
                           work_dir: str | Path | None = None, gallery_dtype: str = "fp32") -> SearchEngine:
        """Embed the distinct images of a dataset (any image input kind the model reads: pixels, regions).

        With ``captions`` (default: on) the dataset's spoken captions are embedded too, for
        :meth:`search_by_image`. Sharding and the index options as in :meth:`build`.
        """
        from vgskit.retrieval.shards import embed_in_shards, resolve_options

        if len(dataset.image_keys) == 0:
            raise SearchIndexError("the gallery is empty: the dataset has no images")
        _check_unique(list(dataset.image_keys), [str(p) for p in dataset.image_paths])
        opts = resolve_options(index_kind=index_kind, memory_budget_mb=memory_budget_mb, workers=workers,
                               work_dir=work_dir, captions=captions)
        was_training = model.training
        model.eval()
        forward = _forward_context(model)

        def embed_images(rows: Any) -> Embeddings:
            with forward():
                return model.embed_image(dataset.image_inputs(rows)).float_cpu()

        def embed_captions(rows: Any) -> Embeddings:
            with forward():
                return model.embed_speech(dataset.speech_inputs(list(rows))).float_cpu()

        try:
            emb = embed_in_shards(embed_images, len(dataset.image_keys), label="images", keys=list(dataset.image_keys),
                                  model=model, batch_size=batch_size, options=opts, progress=progress)
            caption_set = None
            records = getattr(dataset, "records", None)
            if opts.captions and records:
                cap_ids = [r.caption_id for r in records]
                cap_emb = embed_in_shards(embed_captions, len(records), label="captions", keys=cap_ids, model=model,
                                          batch_size=batch_size, options=opts, progress=progress)
                keys = list(dataset.image_keys)
                caption_set = CaptionSet(cap_ids, [r.audio for r in records], cap_emb,
                                         [keys[i] for i in dataset.caption_image_index])
        finally:
            model.train(was_training)
        return cls(model, emb, list(dataset.image_keys), [str(p) for p in dataset.image_paths],
                   captions=caption_set, index_kind=opts.index_kind, memory_budget_mb=opts.memory_budget_mb,
                   gallery_dtype=gallery_dtype, progress=progress)

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.safetensors``, ``ann.faiss`` (approximate kinds) and ``index.json`` as one unit.

        Every file is written under a temporary name and flushed before any is renamed into place; the JSON,
        renamed last, records the size and SHA-256 of the others, so a load after an interrupted rebuild either
        gets a matching set or refuses it. A failed write (full disk) leaves the previous index untouched and
        raises :class:`SearchIndexError`. Nothing in the files depends on when or where they were written: the
        same inputs give the same bytes.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise SearchIndexError(f"search index {directory}: is a file, not a folder")
        tensors = {"image_emb": self.gallery.pooled.contiguous()}
        if self.gallery.tokens is not None and self.gallery.mask is not None:
            tensors.update(image_tokens=self.gallery.tokens.contiguous(), image_mask=self.gallery.mask.contiguous())
        if self.captions is not None:
            cap = self.captions.emb
            tensors["caption_emb"] = cap.pooled.contiguous()
            if cap.tokens is not None and cap.mask is not None:
                tensors.update(caption_tokens=cap.tokens.contiguous(), caption_mask=cap.mask.contiguous())
        tmp_tensors, tmp_json = temp_path_for(directory / INDEX_TENSORS), temp_path_for(directory / INDEX_JSON)
        tmp_ann = temp_path_for(directory / INDEX_ANN)
        temps = (tmp_tensors, tmp_json, tmp_ann)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp_tensors))
            _fsync(tmp_tensors)
            index = {k: v for k, v in self.index_info.items()}
            if self.ann is not None:
                self.ann.write(tmp_ann)
                _fsync(tmp_ann)
                index.update(file=INDEX_ANN, bytes=tmp_ann.stat().st_size, sha256=sha256_file(tmp_ann))
            meta: dict[str, Any] = {
                "format_version": INDEX_FORMAT_VERSION, "embed_dim": int(self.gallery.pooled.shape[1]),
                "count": len(self.image_ids), "image_ids": self.image_ids, "image_paths": self.image_paths,
                "model": model_identity(self.model),
                "tensors": {"file": INDEX_TENSORS, "bytes": tmp_tensors.stat().st_size,
                            "sha256": sha256_file(tmp_tensors)},
                "index": index,
            }
            if self.captions is not None:
                meta["captions"] = {"count": len(self.captions.ids), "ids": self.captions.ids,
                                    "audio_paths": self.captions.audio_paths, "image_ids": self.captions.image_ids}
            with open(tmp_json, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_tensors, directory / INDEX_TENSORS)
            if self.ann is not None:
                os.replace(tmp_ann, directory / INDEX_ANN)
            else:  # an exact rebuild over an approximate index: the old ann.faiss belongs to nothing
                (directory / INDEX_ANN).unlink(missing_ok=True)
            os.replace(tmp_json, directory / INDEX_JSON)
        except (OSError, SafetensorError, RuntimeError) as e:
            for t in temps:
                t.unlink(missing_ok=True)
            full = isinstance(e, OSError) and e.errno == errno.ENOSPC
            raise SearchIndexError(f"search index {directory}: could not be written ({e})"
                                   + ("; free some disk space" if full else "")) from e
        except BaseException:
            for t in temps:
                t.unlink(missing_ok=True)
            raise
        fsync_dir(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module, *, gallery_dtype: str = "fp32",
             precision: str = "fp32") -> SearchEngine:
        """Open a saved index for ``model``, after checking that its files belong together and to ``model``.

        The embeddings are memory-mapped, not copied (see the module docstring for the cost of the check).
        """
        directory = Path(directory)
        meta_path, emb_path = directory / INDEX_JSON, directory / INDEX_TENSORS
        where = f"search index {directory}"
        if directory.exists() and not directory.is_dir():
            raise SearchIndexError(f"{where}: is a file, not an index folder")
        for p in (meta_path, emb_path):
            if not p.is_file():
                raise SearchIndexError(f"{where}: missing {p.name} (build it with `vgskit index`)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise SearchIndexError(f"{where}: unreadable index files ({INDEX_JSON}: {e})") from e
        if not isinstance(meta, dict):
            raise SearchIndexError(f"{where}: unreadable index files ({INDEX_JSON} is not a JSON object)")
        version = meta.get("format_version")
        if version != INDEX_FORMAT_VERSION:
            old = isinstance(version, int) and version < INDEX_FORMAT_VERSION
            why = ("written by an older vgskit, which recorded neither the model nor a checksum" if version == 1
                   else "written by an older vgskit, before approximate indices and memory-mapped embeddings")
            raise SearchIndexError(f"{where}: unsupported format version {version!r}" + (
                f" ({why}); rebuild it with `vgskit index`" if old else ""))
        for name, kind in _REQUIRED_FIELDS.items():
            if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
                got = "missing" if name not in meta else f"a {type(meta[name]).__name__}"
                raise SearchIndexError(f"{where}: {INDEX_JSON} field {name!r} is {got}, expected a {kind.__name__} "
                                       "(rebuild it with `vgskit index`)")
        _verify(emb_path, meta["tensors"], where, INDEX_TENSORS)
        try:
            arrays = _map_safetensors(emb_path)
            tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
            emb = Embeddings(tensors["image_emb"], tensors.get("image_tokens"), tensors.get("image_mask"))
        except (KeyError, OSError, ValueError, RuntimeError, VGSKitError) as e:
            raise SearchIndexError(f"{where}: unreadable index files ({INDEX_TENSORS}: {e!r})") from e
        if not (len(meta["image_ids"]) == len(meta["image_paths"]) == meta["count"] == emb.pooled.shape[0]):
            raise SearchIndexError(f"{where}: inconsistent: {emb.pooled.shape[0]} embeddings, {len(meta['image_ids'])} "
                                   f"ids, {len(meta['image_paths'])} paths, count {meta['count']}")
        if meta["count"] == 0:
            raise SearchIndexError(f"{where}: the gallery is empty: there are no images to search")
        built_by, given = meta["model"], model_identity(model)
        if built_by.get("sha256") != given["sha256"]:
            raise SearchIndexError(
                f"{where}: built with another checkpoint (model {built_by.get('name')!r}, weights+config "
                f"{str(built_by.get('sha256'))[:12]}) than the model given ({given['name']!r}, {given['sha256'][:12]}); "
                "rebuild it with `vgskit index` for this checkpoint, or search with the one that built it")
        captions = None
        if isinstance(meta.get("captions"), dict):
            cap = meta["captions"]
            try:
                captions = CaptionSet(cap["ids"], cap["audio_paths"],
                                      Embeddings(tensors["caption_emb"], tensors.get("caption_tokens"),
                                                 tensors.get("caption_mask")), cap.get("image_ids"))
            except (KeyError, TypeError, VGSKitError) as e:
                raise SearchIndexError(f"{where}: inconsistent captions ({e})") from e
        info = meta["index"]
        kind = info.get("kind")
        if kind not in ann_mod.INDEX_KINDS or kind == "auto":
            raise SearchIndexError(f"{where}: {INDEX_JSON} names an unknown index kind {kind!r}")
        ann = None
        if kind != "exact":
            ann_path = directory / str(info.get("file", INDEX_ANN))
            if not ann_path.is_file():
                raise SearchIndexError(f"{where}: missing {ann_path.name} (the {kind} index; rebuild it with "
                                       "`vgskit index`)")
            _verify(ann_path, info, where, ann_path.name)
            try:
                ann = ann_mod.AnnIndex.read(ann_path, kind, dict(info.get("params", {})))
            except ann_mod.AnnError as e:
                raise SearchIndexError(f"{where}: {e}") from None
        return cls(model, emb, meta["image_ids"], meta["image_paths"], captions=captions, ann=ann,
                   index_info=info, gallery_dtype=gallery_dtype, precision=precision)

    # -- querying ------------------------------------------------------------------------------------------
    def _check_waveform(self, wav: np.ndarray | torch.Tensor) -> np.ndarray:
        """The query as mono float32 in [-1, 1], checked exactly as audio read from a file is.

        Integer PCM is scaled (int16 / 32768, ...), and non-finite, silent (all zero or constant) and
        absurdly loud samples are refused by :func:`vgskit.audio.validate_waveform`: without it an int16 array
        was searched 32768 times too loud and an all-zero query gave NaN scores.
        """
        from vgskit.audio import validate_waveform

        if isinstance(wav, torch.Tensor):
            t = wav.detach().cpu()
            raw = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16
        else:
            raw = np.asarray(wav)
        sr = int(self.model.sample_rate)
        checked = validate_waveform(raw, sr, source="query waveform")
        if checked.shape[0] < sr * MIN_QUERY_SECONDS:
            raise VGSKitError(
                f"query waveform is too short: {checked.shape[0]} samples ({checked.shape[0] / sr:.3f} s); "
                f"at least {MIN_QUERY_SECONDS} s is needed")
        return np.ascontiguousarray(checked, dtype=np.float32)

    @torch.no_grad()
    def embed_query(self, wav: np.ndarray | torch.Tensor) -> Embeddings:
        """:class:`Embeddings` of one mono waveform at the model's sample rate (one row)."""
        from vgskit.contract import SpeechInputs

        wav_t = torch.from_numpy(self._check_waveform(wav))[None]  # [1, T]
        sr = int(self.model.sample_rate)
        speech = SpeechInputs.waveform(wav_t, torch.tensor([wav_t.shape[1]]), sr)
        with autocast(self.precision, _model_device(self.model)):
            return self.model.embed_speech(speech).float_cpu()

    @property
    def accepts_text(self) -> bool:
        """Whether written queries can be embedded: the model reads transcripts (``speech_input == "text"``) or
        has a text tower behind its recogniser (``encode_texts``, the speech → ASR → text cascade)."""
        return self.model.speech_input == "text" or callable(getattr(self.model, "encode_texts", None))

    @torch.no_grad()
    def embed_text(self, text: str) -> torch.Tensor:
        """Pooled embedding ``[D]`` of a written query, for models with a text tower (see :attr:`accepts_text`)."""
        from vgskit.contract import SpeechInputs

        if not self.accepts_text:
            name = getattr(self.model, "model_name", None) or type(self.model).__name__
            raise VGSKitError(f"model {name!r} has no text tower: search with speech (or an embedding)")
        if not isinstance(text, str) or not text.strip():
            raise VGSKitError("a text query must be a non-empty string")
        with autocast(self.precision, _model_device(self.model)):
            if self.model.speech_input == "text":
                emb = self.model.embed_speech(SpeechInputs.from_texts([text])).pooled
            else:
                emb = self.model.encode_texts([text])
        return emb.float().cpu()[0]

    def search_by_text(self, text: str, k: int = 5) -> list[Hit]:
        """The ``k`` nearest images of a written query (models with a text tower)."""
        return self.search_by_embedding(self.embed_text(text), k)

    def embed_audio(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``[D]`` of one mono waveform at the model's sample rate."""
        return self.embed_query(wav).pooled[0]

    @torch.no_grad()
    def embed_image(self, image: str | Path | torch.Tensor) -> Embeddings:
        """:class:`Embeddings` (one row) of an image file, or of normalised pixels ``[3, S, S]``/``[1, 3, S, S]``."""
        from vgskit.contract import ImageInputs

        if self.model.image_input != "pixels":
            raise VGSKitError(f"model {getattr(self.model, 'model_name', None)!r} reads {self.model.image_input}, "
                              "not pixels: search with a gallery image id (search_by_image_id)")
        if isinstance(image, (str, Path)):
            from vgskit.images import load_image
            from vgskit.models.base import image_transform_of

            pixels = image_transform_of(self.model)(load_image(image))[None]
        else:
            pixels = image.detach().float().cpu()
            pixels = pixels[None] if pixels.dim() == 3 else pixels
            size = self.model.image_transform.get("size")
            if pixels.dim() != 4 or pixels.shape[:2] != (1, 3) or (size and tuple(pixels.shape[2:]) != (size, size)):
                raise VGSKitError(f"image pixels must be [3, {size}, {size}] (normalised), got {tuple(image.shape)}")
            if not torch.isfinite(pixels).all():
                raise VGSKitError("image pixels contain NaN or infinite values")
        with autocast(self.precision, _model_device(self.model)):
            return self.model.embed_image(ImageInputs.from_pixels(pixels)).float_cpu()

    def _coarse(self, vec: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best gallery rows for one pooled query: (scores, rows), best first, exact scores."""
        if self.ann is None:
            gallery = self.gallery.pooled
            # One sequential pass over the contiguous gallery. NumPy's BLAS (sgemv) streams a row-major gallery at
            # the memory bandwidth where torch.mv reaches about 0.3x of it (1M x 256, 2 threads: 18 ms against a
            # 20 ms read of the gallery by torch.sum, torch.mv 77 ms; benchmarks/serve_load.py). OpenBLAS called
            # from many threads at once slows to a crawl, so one scan at a time takes that path and scans that
            # arrive meanwhile (a server's other requests) use torch.mv: the same dot products, summed in
            # another order (scores may differ in the last bit).
            fast = gallery.dtype == torch.float32 and gallery.is_contiguous() and vec.dtype == torch.float32
            if fast and _SCAN_LOCK.acquire(blocking=False):
                try:
                    scores = torch.from_numpy(np.dot(gallery.numpy(), vec.contiguous().numpy()))
                finally:
                    _SCAN_LOCK.release()
            else:
                scores = torch.mv(gallery, vec)
            top = torch.topk(scores, min(k, scores.shape[0]))
            return top.values, top.indices
        cand = self.ann.candidates(vec[None].numpy(), max(ann_mod.n_candidates(k), k))[0]
        return ann_mod.refine(self.gallery.pooled, vec, cand, k)

    def _rerank(self, query: Embeddings, cand: torch.Tensor, targets: Embeddings, k: int, *,
                query_is_speech: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine scores of the coarse candidates ``cand`` (rows of ``targets``); the best ``k`` as (scores, rows)."""
        if query.tokens is None and targets.tokens is not None and self.model.has_fine_scores:
            raise VGSKitError("rerank_top needs the query's token-level embeddings: search with audio (or an "
                              "Embeddings with tokens), not a pooled vector")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        q = query.select([0] * len(cand)).to_device(device)
        t = targets.select(cand).to_device(device)
        with torch.no_grad():
            fine = (self.model.score_pairs(q, t) if query_is_speech else self.model.score_pairs(t, q))
        fine = fine.float().reshape(-1).cpu()
        order = torch.sort(fine, descending=True, stable=True).indices[:k]
        return fine[order], cand[order]

    def _check_k(self, k: int, rerank_top: int | None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise VGSKitError(f"k must be >= 1, got {k!r}")
        if rerank_top is not None:
            if not self.model.has_fine_scores:
                raise VGSKitError("rerank_top: this model has no fine scorer (score_pairs) to re-rank with")
            if isinstance(rerank_top, bool) or not isinstance(rerank_top, int) or rerank_top < k:
                raise VGSKitError(f"rerank_top ({rerank_top!r}) must be >= k ({k})")

    @torch.no_grad()
    def search_by_embedding(self, vec: torch.Tensor | np.ndarray | Embeddings, k: int = 5, *,
                            rerank_top: int | None = None) -> list[Hit]:
        """Top-k gallery images for a query embedding: a pooled vector ``[D]``, or the model's :class:`Embeddings`
        of one speech query (needed for ``rerank_top``, which re-ranks the N best coarse hits finely)."""
        self._check_k(k, rerank_top)
        query = vec if isinstance(vec, Embeddings) else Embeddings(_as_query_vector(vec, self.image_emb.shape[1])[None])
        pooled = _as_query_vector(query.pooled[0], self.image_emb.shape[1])
        if rerank_top is None:
            scores, rows = self._coarse(pooled, k)
        else:
            _, cand = self._coarse(pooled, rerank_top)
            scores, rows = self._rerank(query, cand, self.gallery, k, query_is_speech=True)
        return [Hit(rank=i + 1, item_id=self.image_ids[j], path=self.image_paths[j], score=float(s))
                for i, (s, j) in enumerate(zip(scores.tolist(), rows.tolist(), strict=True))]

    @torch.no_grad()
    def search_batch(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k for many pooled queries ``[B, D]`` at once: ``(scores [B, k], rows [B, k])``, best first.

        Exact indices score the whole batch with one GEMM (the gallery is read once for all queries), in the
        bfloat16 copy when ``gallery_dtype="bf16"``; approximate ones search the batch and refine each query.
        """
        self._check_k(k, None)
        q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries).float()
        if q.dim() != 2 or q.shape[1] != self.image_emb.shape[1]:
            raise VGSKitError(f"queries must be [B, {self.image_emb.shape[1]}], got {tuple(q.shape)}")
        k = min(k, self.image_emb.shape[0])
        if self.ann is not None:
            cand = self.ann.candidates(q.numpy(), ann_mod.n_candidates(k))
            parts = [ann_mod.refine(self.gallery.pooled, q[i], cand[i], k) for i in range(q.shape[0])]
            return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        if self._gallery_bf16 is not None:
            # bf16 scores pick candidates (the GEMM reads half the bytes); each query's candidates are then scored
            # exactly in float32, so scores are exact and only a true neighbour ranked below the
            # max(10k, 100) bf16 candidates can be missed (bf16 alone: top-10 overlap 0.75 on clustered vectors).
            rough = (q.to(torch.bfloat16) @ self._gallery_bf16.T).float()  # [B, N]
            cand = torch.topk(rough, min(ann_mod.n_candidates(k), rough.shape[1]), dim=1).indices  # [B, C]
            exact = torch.einsum("bd,bcd->bc", q, self.gallery.pooled[cand])  # [B, C] float32
            top = torch.topk(exact, k, dim=1)
            return top.values, cand.gather(1, top.indices)
        scores = q @ self.gallery.pooled.T
        top = torch.topk(scores, k, dim=1)
        return top.values, top.indices

    @torch.no_grad()
    def search_by_waveform(self, wav: np.ndarray | torch.Tensor, k: int = 5, *,
                           rerank_top: int | None = None) -> list[Hit]:
        """Top-k gallery images for a mono waveform at the model's rate.

        ``rerank_top=N`` re-ranks the N best coarse candidates with the model's fine scorer (``k <= N``).
        """
        self._check_k(k, rerank_top)
        return self.search_by_embedding(self.embed_query(wav), k, rerank_top=rerank_top)

    def search_by_audio(self, path: str | Path, k: int = 5, *, max_seconds: float | None = 60.0,
                        rerank_top: int | None = None) -> list[Hit]:
        """Top-k gallery images for an audio file (any format/rate; resampled to the model's rate, mono)."""
        from vgskit.audio import load_audio

        rate = int(self.model.sample_rate)
        return self.search_by_waveform(load_audio(path, sample_rate=rate, max_seconds=max_seconds), k,
                                       rerank_top=rerank_top)

    # -- image -> spoken captions --------------------------------------------------------------------------
    def _caption_set(self) -> CaptionSet:
        if self.captions is None:
            raise VGSKitError("this index holds no spoken captions: build it from a dataset "
                              "(SearchEngine.build_from_dataset, `vgskit index`) to search images -> speech")
        return self.captions

    @torch.no_grad()
    def search_captions(self, query: Embeddings, k: int = 5, *, rerank_top: int | None = None) -> list[Hit]:
        """Top-k spoken captions for an image's :class:`Embeddings` (one row); ``Hit.path`` is the audio file."""
        captions = self._caption_set()
        self._check_k(k, rerank_top)
        vec = _as_query_vector(query.pooled[0], captions.emb.pooled.shape[1])
        scores = torch.mv(captions.emb.pooled, vec)
        top = torch.topk(scores, min(rerank_top or k, scores.shape[0]))
        values, rows = top.values[:k], top.indices[:k]
        if rerank_top is not None:
            values, rows = self._rerank(query, top.indices, captions.emb, k, query_is_speech=False)
        return [Hit(rank=i + 1, item_id=captions.ids[j], path=captions.audio_paths[j], score=float(s))
                for i, (s, j) in enumerate(zip(values.tolist(), rows.tolist(), strict=True))]

    def search_by_image(self, image: str | Path | torch.Tensor, k: int = 5, *,
                        rerank_top: int | None = None) -> list[Hit]:
        """Top-k spoken captions for an image file or its normalised pixels ``[3, S, S]`` (pixel models)."""
        self._caption_set()
        return self.search_captions(self.embed_image(image), k, rerank_top=rerank_top)

    def search_by_image_id(self, image_id: str, k: int = 5, *, rerank_top: int | None = None) -> list[Hit]:
        """Top-k spoken captions for a gallery image, from its stored embedding (no image is decoded)."""
        row = self._row_of.get(str(image_id))
        if row is None:
            raise VGSKitError(f"the gallery has no image with id {image_id!r}")
        return self.search_captions(self.gallery.select([row]), k, rerank_top=rerank_top)


def _as_query_vector(vec: torch.Tensor | np.ndarray, width: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(vec) if not isinstance(vec, torch.Tensor) else vec).detach().float().cpu()
    t = t.reshape(-1) if t.dim() == 2 and t.shape[0] == 1 else t
    if t.dim() != 1 or t.shape[0] != width:
        raise VGSKitError(f"query embedding must have {width} values, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise VGSKitError("query embedding contains NaN or infinite values")
    return t.contiguous()


def _verify(path: Path, recorded: dict[str, Any], where: str, name: str) -> None:
    """Size and SHA-256 of ``path`` against what index.json recorded (one sequential read of the file)."""
    size = path.stat().st_size
    if size != recorded.get("bytes") or sha256_file(path) != recorded.get("sha256"):
        raise SearchIndexError(
            f"{where}: {name} does not match {INDEX_JSON} ({size} bytes, the JSON records "
            f"{recorded.get('bytes')} with another checksum): the files come from different builds (an "
            "interrupted or concurrent write) or were modified; rebuild it with `vgskit index`")


def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a copy-on-write ``numpy.memmap`` (nothing is read until used).

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
    byte range, then the raw little-endian data: each tensor is mapped at its offset. Copy-on-write keeps the
    arrays writable for ``torch.from_numpy`` while no write can reach the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise ValueError(f"header length {n} does not fit the file")
        header = json.loads(f.read(n))
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(_ST_DTYPES[spec["dtype"]])
        shape = tuple(int(x) for x in spec["shape"])
        start, end = (int(x) for x in spec["data_offsets"])
        if end - start != math.prod(shape) * dtype.itemsize or base + end > size:
            raise ValueError(f"tensor {name!r}: byte range {start}-{end} does not match shape {shape}")
        if math.prod(shape) == 0:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="c", offset=base + start, shape=shape)
    return out


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _check_unique(ids: Sequence[str], paths: Sequence[str], *, defaulted: bool = False) -> None:
    """Refuse a gallery in which two images share an id: a hit could not say which image it is."""
    first: dict[str, int] = {}
    for i, item in enumerate(ids):
        j = first.setdefault(str(item), i)
        if j != i:
            where = (f" (images {paths[j]} and {paths[i]})" if max(i, j) < len(paths) else "")
            hint = ("; ids default to the file names without extension, so give image_ids explicitly"
                    if defaulted else "; gallery ids must be unique")
            raise SearchIndexError(f"duplicate gallery id {str(item)!r}{where}{hint}")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _forward_context(model: torch.nn.Module) -> Any:
    """A factory of the context the gallery's forwards run in: the enclosing :func:`vgskit.precision.precision_scope`'s
    precision (``vgskit index --precision bf16``), resolved once for the model's device."""
    device = _model_device(model)
    precision = resolve_precision(None, device)
    return lambda: autocast(precision, device)
