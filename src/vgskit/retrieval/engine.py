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

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vgskit.errors import VGSKitError
from vgskit.fileio import temp_path_for, write_text_atomic

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
    """A gallery of L2-normalised image embeddings searched with spoken queries by dot product."""

    def __init__(self, model: torch.nn.Module, image_emb: torch.Tensor, image_ids: Sequence[str],
                 image_paths: Sequence[str]):
        if image_emb.ndim != 2 or image_emb.shape[0] != len(image_ids) or len(image_ids) != len(image_paths):
            raise VGSKitError(
                f"index is inconsistent: {tuple(image_emb.shape)} embeddings, {len(image_ids)} ids, "
                f"{len(image_paths)} paths"
            )
        embed_dim = getattr(model, "embed_dim", image_emb.shape[1])
        if image_emb.shape[1] != embed_dim:
            raise VGSKitError(
                f"index embeddings have dimension {image_emb.shape[1]} but the model embeds to {embed_dim}: "
                "the index was built with another checkpoint (rebuild it with `vgskit index`)"
            )
        self.model = model.eval()
        self.image_emb = image_emb.float()
        self.image_ids = list(image_ids)
        self.image_paths = list(image_paths)

    # -- building -----------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, image_paths: Sequence[str], image_ids: Sequence[str] | None = None,
              *, batch_size: int = 64, progress: bool = False) -> SearchEngine:
        """Embed every gallery image once (bad images raise an error that names the file)."""
        from vgskit.images import load_image
        from vgskit.models.base import image_transform_of

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
            chunks.append(model.encode_image(torch.stack(batch)).float())
        emb = torch.cat(chunks) if chunks else torch.zeros(0, 1)
        return cls(model, emb, ids, [str(p) for p in image_paths])

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.safetensors`` then ``index.json`` (each atomically; the JSON last, as the marker)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(directory / "index.safetensors")
        save_file({"image_emb": self.image_emb.contiguous()}, str(tmp))
        os.replace(tmp, directory / "index.safetensors")
        meta = {"format_version": INDEX_FORMAT_VERSION, "embed_dim": int(self.image_emb.shape[1]),
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
            emb = load_file(str(emb_path))["image_emb"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, OSError, RuntimeError) as e:
            raise VGSKitError(f"search index {directory}: unreadable index files ({e})") from e
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise VGSKitError(f"search index {directory}: unsupported format version {meta.get('format_version')}")
        return cls(model, emb, meta["image_ids"], meta["image_paths"])

    # -- querying ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_audio(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embedding of one mono waveform at the model's sample rate (``[T]`` → ``[D]``)."""
        wav_np = np.asarray(wav, dtype=np.float32)
        if wav_np.ndim != 1:
            raise VGSKitError(f"query waveform must be 1-D mono samples, got shape {wav_np.shape}")
        sr = int(getattr(self.model, "sample_rate", 16000))
        if wav_np.shape[0] < sr * MIN_QUERY_SECONDS:
            raise VGSKitError(
                f"query waveform is too short: {wav_np.shape[0]} samples ({wav_np.shape[0] / sr:.3f} s); "
                f"at least {MIN_QUERY_SECONDS} s is needed")
        if not np.isfinite(wav_np).all():
            raise VGSKitError("query waveform contains NaN or infinite samples")
        wav_t = torch.from_numpy(wav_np)[None]
        lengths = torch.tensor([wav_t.shape[1]])
        return self.model.encode_speech(wav_t, lengths).float()[0]

    def search_by_waveform(self, wav: np.ndarray | torch.Tensor, k: int = 5) -> list[Hit]:
        """Top-k gallery images for a 16 kHz mono waveform."""
        if k < 1:
            raise VGSKitError(f"k must be >= 1, got {k}")
        scores = self.image_emb @ self.embed_audio(wav)
        top = torch.topk(scores, min(k, len(self.image_ids)))
        return [Hit(rank=i + 1, item_id=self.image_ids[j], path=self.image_paths[j], score=float(s))
                for i, (s, j) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True))]

    def search_by_audio(self, path: str | Path, k: int = 5, *, max_seconds: float | None = 60.0) -> list[Hit]:
        """Top-k gallery images for an audio file (any format/rate; resampled to 16 kHz mono)."""
        from vgskit.audio import load_audio

        return self.search_by_waveform(load_audio(path, max_seconds=max_seconds), k)
