"""SearchEngine: spoken-query image search (and image→caption search) over a trained retrieval model.

The engine is deliberately small and framework-free on the outside: give it a model and a gallery, then
ask with audio files or waveforms. The gallery embeddings are stored as ``safetensors`` + JSON so that an
index built once can be served many times::

    engine = SearchEngine.build(model, image_paths, image_ids)
    engine.save("runs/demo/index")
    engine = SearchEngine.load("runs/demo/index", model)
    hits = engine.search_by_audio("query.wav", k=5)

An index is one unit. ``index.json`` (ids, paths, the model's identity) records the size and SHA-256 of
``index.safetensors`` (the embeddings), and :meth:`SearchEngine.load` verifies them: embeddings from one build
are never served with the ids of another, whatever was interrupted (a killed rebuild, two writers). The
model's identity is a hash of its weights and config (:func:`model_identity`); an index is only searched with
the model that built it, since another checkpoint of the same width would answer without any sign of error.
Query waveforms go through the same checks as audio files (:func:`vgskit.audio.validate_waveform`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vgskit.contract import Embeddings
from vgskit.errors import ConfigError, VGSKitError
from vgskit.fileio import fsync_dir, sha256_file, temp_path_for
from vgskit.models.base import RetrievalModel

# 2: index.json records the embeddings file's size and SHA-256 and the identity of the model that built it.
INDEX_FORMAT_VERSION = 2
INDEX_JSON = "index.json"
INDEX_TENSORS = "index.safetensors"
_REQUIRED_FIELDS = {"format_version": int, "embed_dim": int, "count": int, "image_ids": list, "image_paths": list,
                    "model": dict, "tensors": dict}
# Shorter queries leave the speech encoders with no complete frame after their strided layers.
MIN_QUERY_SECONDS = 0.1


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
    rank: int
    item_id: str
    path: str
    score: float


class SearchEngine:
    """A gallery of image embeddings searched with spoken queries.

    Coarse search ranks the gallery by the dot product of pooled embeddings. For a model with a fine
    scorer (``has_fine_scores``) the index also keeps the images' token-level embeddings, and a search with
    ``rerank_top=N`` re-ranks the N best coarse candidates with the model's ``score_pairs`` (FaST-VGS's
    coarse-to-fine retrieval); the hits' scores are then the fine scores.
    """

    def __init__(self, model: RetrievalModel, image_emb: torch.Tensor | Embeddings, image_ids: Sequence[str],
                 image_paths: Sequence[str]):
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
        self.model = model.eval()
        self.gallery = emb.float_cpu()
        self.image_ids = [str(i) for i in image_ids]
        self.image_paths = [str(p) for p in image_paths]

    @property
    def image_emb(self) -> torch.Tensor:
        """Pooled gallery embeddings ``[N, D]``."""
        return self.gallery.pooled

    # -- building -----------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, image_paths: Sequence[str], image_ids: Sequence[str] | None = None,
              *, batch_size: int = 64, progress: bool = False) -> SearchEngine:
        """Embed every gallery image file once (pixel models; bad images raise an error that names the file)."""
        from vgskit.contract import ImageInputs
        from vgskit.images import load_image
        from vgskit.models.base import image_transform_of

        if model.image_input != "pixels":
            raise VGSKitError(f"model {getattr(model, 'model_name', None)!r} reads {model.image_input}, not image "
                              "files: build the index from a dataset (SearchEngine.build_from_dataset)")
        transform = image_transform_of(model)
        ids = list(image_ids) if image_ids is not None else [Path(p).stem for p in image_paths]
        if not image_paths:
            raise SearchIndexError("the gallery is empty: no image files were given")
        _check_unique(ids, image_paths, defaulted=image_ids is None)
        model.eval()
        chunks = []
        rng = range(0, len(image_paths), batch_size)
        if progress:
            from tqdm import tqdm

            rng = tqdm(rng, desc="indexing images", unit="batch")
        for start in rng:
            batch = [transform(load_image(p)) for p in image_paths[start:start + batch_size]]
            chunks.append(model.embed_image(ImageInputs.from_pixels(torch.stack(batch))).float_cpu())
        emb = Embeddings.cat(chunks) if chunks else Embeddings(torch.zeros(0, model.embed_dim))
        return cls(model, emb, ids, [str(p) for p in image_paths])

    @classmethod
    @torch.no_grad()
    def build_from_dataset(cls, model: torch.nn.Module, dataset: Any, *, batch_size: int = 64,
                           progress: bool = False) -> SearchEngine:
        """Embed the distinct images of a dataset (any image input kind the model reads: pixels, regions)."""
        from vgskit.retrieval.evaluate import embed_images

        if len(dataset.image_keys) == 0:
            raise SearchIndexError("the gallery is empty: the dataset has no images")
        _check_unique(list(dataset.image_keys), [str(p) for p in dataset.image_paths])
        emb = embed_images(model, dataset, batch_size)
        return cls(model, emb, list(dataset.image_keys), [str(p) for p in dataset.image_paths])

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.safetensors`` and ``index.json`` as one verifiable unit (see the module docstring).

        Both files are written under temporary names and flushed before either is renamed into place; the
        JSON, renamed last, records the size and SHA-256 of the embeddings file, so a load after an
        interrupted rebuild either gets a matching pair or refuses it. A failed write (full disk) leaves the
        previous index untouched and raises :class:`SearchIndexError`.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise SearchIndexError(f"search index {directory}: is a file, not a folder")
        tensors = {"image_emb": self.gallery.pooled.contiguous()}
        if self.gallery.tokens is not None and self.gallery.mask is not None:
            tensors.update(image_tokens=self.gallery.tokens.contiguous(), image_mask=self.gallery.mask.contiguous())
        tmp_tensors, tmp_json = temp_path_for(directory / INDEX_TENSORS), temp_path_for(directory / INDEX_JSON)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp_tensors))
            _fsync(tmp_tensors)
            meta = {
                "format_version": INDEX_FORMAT_VERSION, "embed_dim": int(self.gallery.pooled.shape[1]),
                "count": len(self.image_ids), "image_ids": self.image_ids, "image_paths": self.image_paths,
                "model": model_identity(self.model),
                "tensors": {"file": INDEX_TENSORS, "bytes": tmp_tensors.stat().st_size,
                            "sha256": sha256_file(tmp_tensors)},
            }
            with open(tmp_json, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_tensors, directory / INDEX_TENSORS)
            os.replace(tmp_json, directory / INDEX_JSON)
        except (OSError, SafetensorError) as e:
            tmp_tensors.unlink(missing_ok=True)
            tmp_json.unlink(missing_ok=True)
            full = isinstance(e, OSError) and e.errno == errno.ENOSPC
            raise SearchIndexError(f"search index {directory}: could not be written ({e})"
                              + ("; free some disk space" if full else "")) from e
        except BaseException:
            tmp_tensors.unlink(missing_ok=True)
            tmp_json.unlink(missing_ok=True)
            raise
        fsync_dir(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module) -> SearchEngine:
        """Open a saved index for ``model``, after checking that its files belong together and to ``model``."""
        directory = Path(directory)
        meta_path, emb_path = directory / INDEX_JSON, directory / INDEX_TENSORS
        where = f"search index {directory}"
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
            raise SearchIndexError(f"{where}: unsupported format version {version!r}" + (
                " (written by an older vgskit, which recorded neither the model nor a checksum); rebuild it with "
                "`vgskit index`" if old else ""))
        for name, kind in _REQUIRED_FIELDS.items():
            if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
                got = "missing" if name not in meta else f"a {type(meta[name]).__name__}"
                raise SearchIndexError(f"{where}: {INDEX_JSON} field {name!r} is {got}, expected a {kind.__name__} "
                                  "(rebuild it with `vgskit index`)")
        recorded = meta["tensors"]
        size = emb_path.stat().st_size
        if size != recorded.get("bytes") or sha256_file(emb_path) != recorded.get("sha256"):
            raise SearchIndexError(
                f"{where}: {INDEX_TENSORS} does not match {INDEX_JSON} ({size} bytes, the JSON records "
                f"{recorded.get('bytes')} with another checksum): the files come from different builds (an "
                "interrupted or concurrent write) or were modified; rebuild it with `vgskit index`")
        try:
            tensors = load_file(str(emb_path))
            emb = Embeddings(tensors["image_emb"], tensors.get("image_tokens"), tensors.get("image_mask"))
        except (SafetensorError, KeyError, OSError, RuntimeError, VGSKitError) as e:
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
        return cls(model, emb, meta["image_ids"], meta["image_paths"])

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
        return self.model.embed_speech(speech).float_cpu()

    def embed_audio(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``[D]`` of one mono waveform at the model's sample rate."""
        return self.embed_query(wav).pooled[0]

    @torch.no_grad()
    def search_by_waveform(self, wav: np.ndarray | torch.Tensor, k: int = 5, *,
                           rerank_top: int | None = None) -> list[Hit]:
        """Top-k gallery images for a mono waveform at the model's rate.

        ``rerank_top=N`` re-ranks the N best coarse candidates with the model's fine scorer (``k <= N``).
        """
        if k < 1:
            raise VGSKitError(f"k must be >= 1, got {k}")
        query = self.embed_query(wav)
        scores = self.gallery.pooled @ query.pooled[0]  # [N]
        if rerank_top is None:
            top = torch.topk(scores, min(k, len(self.image_ids)))
            pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        else:
            if not self.model.has_fine_scores:
                raise VGSKitError("rerank_top: this model has no fine scorer (score_pairs) to re-rank with")
            if rerank_top < k:
                raise VGSKitError(f"rerank_top ({rerank_top}) must be >= k ({k})")
            from vgskit.retrieval.evaluate import coarse_candidates

            cand = coarse_candidates(lambda rows: scores[None], 1, rerank_top)[0]  # [m] best first
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            fine = self.model.score_pairs(query.select([0] * len(cand)).to_device(device),
                                          self.gallery.select(cand).to_device(device)).float().reshape(-1).cpu()
            order = torch.sort(fine, descending=True, stable=True).indices[:k]
            pairs = zip(fine[order].tolist(), cand[order].tolist(), strict=True)
        return [Hit(rank=i + 1, item_id=self.image_ids[j], path=self.image_paths[j], score=float(s))
                for i, (s, j) in enumerate(pairs)]

    def search_by_audio(self, path: str | Path, k: int = 5, *, max_seconds: float | None = 60.0,
                        rerank_top: int | None = None) -> list[Hit]:
        """Top-k gallery images for an audio file (any format/rate; resampled to the model's rate, mono)."""
        from vgskit.audio import load_audio

        rate = int(self.model.sample_rate)
        return self.search_by_waveform(load_audio(path, sample_rate=rate, max_seconds=max_seconds), k,
                                       rerank_top=rerank_top)


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
