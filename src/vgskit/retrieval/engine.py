"""SearchEngine: spoken-query image search (and image→caption search) over a trained retrieval model.

The engine is deliberately small and framework-free on the outside: give it a model and a gallery, then
ask with audio files or waveforms. The gallery embeddings are stored as ``safetensors`` + JSON so that an
index built once can be served many times::

    engine = SearchEngine.build(model, image_paths, image_ids)
    engine.save("runs/demo/index")
    engine = SearchEngine.load("runs/demo/index", model)
    hits = engine.search_by_audio("query.wav", k=5)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vgskit.contract import Embeddings
from vgskit.errors import VGSKitError
from vgskit.fileio import temp_path_for, write_text_atomic
from vgskit.models.base import RetrievalModel

INDEX_FORMAT_VERSION = 1
# Shorter queries leave the speech encoders with no complete frame after their strided layers.
MIN_QUERY_SECONDS = 0.1


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
        self.image_ids = list(image_ids)
        self.image_paths = list(image_paths)

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

        emb = embed_images(model, dataset, batch_size)
        return cls(model, emb, list(dataset.image_keys), [str(p) for p in dataset.image_paths])

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.safetensors`` then ``index.json`` (each atomically; the JSON last, as the marker)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"image_emb": self.gallery.pooled.contiguous()}
        if self.gallery.tokens is not None and self.gallery.mask is not None:
            tensors.update(image_tokens=self.gallery.tokens.contiguous(), image_mask=self.gallery.mask.contiguous())
        tmp = temp_path_for(directory / "index.safetensors")
        save_file(tensors, str(tmp))
        os.replace(tmp, directory / "index.safetensors")
        meta = {"format_version": INDEX_FORMAT_VERSION, "embed_dim": int(self.gallery.pooled.shape[1]),
                "image_ids": self.image_ids, "image_paths": self.image_paths}
        write_text_atomic(directory / "index.json", json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module) -> SearchEngine:
        directory = Path(directory)
        meta_path, emb_path = directory / "index.json", directory / "index.safetensors"
        for p in (meta_path, emb_path):
            if not p.is_file():
                raise VGSKitError(f"search index {directory}: missing {p.name} (build it with `vgskit index`)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(emb_path))
            emb = Embeddings(tensors["image_emb"], tensors.get("image_tokens"), tensors.get("image_mask"))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, OSError, RuntimeError, VGSKitError) as e:
            raise VGSKitError(f"search index {directory}: unreadable index files ({e})") from e
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise VGSKitError(f"search index {directory}: unsupported format version {meta.get('format_version')}")
        return cls(model, emb, meta["image_ids"], meta["image_paths"])

    # -- querying ------------------------------------------------------------------------------------------
    def _check_waveform(self, wav: np.ndarray | torch.Tensor) -> np.ndarray:
        wav_np = np.asarray(wav, dtype=np.float32)
        if wav_np.ndim != 1:
            raise VGSKitError(f"query waveform must be 1-D mono samples, got shape {wav_np.shape}")
        sr = int(self.model.sample_rate)
        if wav_np.shape[0] < sr * MIN_QUERY_SECONDS:
            raise VGSKitError(
                f"query waveform is too short: {wav_np.shape[0]} samples ({wav_np.shape[0] / sr:.3f} s); "
                f"at least {MIN_QUERY_SECONDS} s is needed")
        if not np.isfinite(wav_np).all():
            raise VGSKitError("query waveform contains NaN or infinite samples")
        return wav_np

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
