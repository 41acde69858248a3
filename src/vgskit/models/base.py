"""The contract every retrieval model follows.

A :class:`RetrievalModel` is an ``nn.Module`` built from one dataclass config (``config_class``) that
offers L2-normalised embeddings for coarse search (``encode_speech``, ``encode_image``), optionally fine
cross-modal scores (``score_pairs``), and a training ``forward(batch) -> {"loss": ..., **scalars}``.
``image_transform`` describes the image preprocessing the weights expect, as a plain dict with the fields
of :class:`vgskit.images.ImageTransform`, so preprocessing travels with the checkpoint.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn


class RetrievalModel(nn.Module):
    """Base class of speech–image retrieval models.

    Class attributes:
        config_class: the dataclass type of ``config``.
        has_fine_scores: whether :meth:`score_pairs` is implemented.

    Instance attributes:
        config: the model's dataclass config (everything needed to rebuild it).
        model_name: registry name the model was created under (set by :func:`vgskit.models.create_model`).
    """

    config_class: ClassVar[type]
    has_fine_scores: ClassVar[bool] = False
    sample_rate: int = 16000

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.model_name: str | None = None

    @property
    def embed_dim(self) -> int:
        """Dimension of the coarse embeddings."""
        raise NotImplementedError

    @property
    def image_transform(self) -> dict[str, Any]:
        """Image preprocessing as a plain dict: ``size``, ``mean``, ``std``, ``resize_mode``, ``interpolation``."""
        raise NotImplementedError

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        """``wavs [B, T]`` float32 at ``sample_rate`` + ``lengths [B]`` samples → ``[B, D]`` unit vectors."""
        raise NotImplementedError

    def encode_image(self, pixels: Tensor) -> Tensor:
        """``pixels [B, 3, S, S]`` (normalised per ``image_transform``) → ``[B, D]`` unit vectors."""
        raise NotImplementedError

    def score_pairs(self, speech_inputs: Any, image_inputs: Any) -> Tensor:
        """Fine scores ``[B]`` for aligned (speech, image) pairs; only models with ``has_fine_scores``."""
        raise NotImplementedError(f"{type(self).__name__} has no fine cross-modal scorer")

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Training step outputs: ``{"loss": scalar, **other scalars for logging}``."""
        raise NotImplementedError


def image_transform_of(model: RetrievalModel) -> Any:
    """The :class:`vgskit.images.ImageTransform` described by ``model.image_transform``."""
    from vgskit.images import ImageTransform

    return ImageTransform.from_json(dict(model.image_transform))
