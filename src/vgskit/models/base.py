"""The contract every retrieval model follows.

A :class:`RetrievalModel` is an ``nn.Module`` built from one dataclass config (``config_class``) that
offers L2-normalised embeddings for coarse search (``encode_speech``, ``encode_image``), optionally fine
cross-modal scores (``score_pairs``), and a training ``forward(batch) -> {"loss": ..., **scalars}``.
``image_transform`` describes the image preprocessing the weights expect, as a plain dict with the fields
of :class:`vgskit.images.ImageTransform`, so preprocessing travels with the checkpoint.

Two optional hooks let generic training code work with any model:

* frozen towers (:meth:`RetrievalModel.frozen_towers`, :meth:`RetrievalModel.set_tower`): a model whose
  pretrained towers are frozen names them, so their outputs can be extracted once and a stand-in that
  serves the stored outputs (:mod:`vgskit.data.cache`) can replace them during training;
* :meth:`RetrievalModel.adapt_config_to_corpus`: a config that depends on the training data (SpeechCLIP's
  keyword vocabulary is the set of subwords of the training captions) is completed before the model is
  built, and the result is stored in the config, so a saved model rebuilds without the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from vgskit.errors import ConfigError


class RetrievalModel(nn.Module):
    """Base class of speech–image retrieval models.

    Class attributes:
        config_class: the dataclass type of ``config``.
        has_fine_scores: whether :meth:`score_pairs` is implemented.
        tower_attributes: tower kind (``"speech"``, ``"image"``) → attribute holding that tower, for
            :meth:`set_tower`.

    Instance attributes:
        config: the model's dataclass config (everything needed to rebuild it).
        model_name: registry name the model was created under (set by :func:`vgskit.models.create_model`).
    """

    config_class: ClassVar[type]
    has_fine_scores: ClassVar[bool] = False
    tower_attributes: ClassVar[Mapping[str, str]] = {}
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

    def frozen_towers(self) -> dict[str, nn.Module]:
        """Frozen towers whose outputs may be precomputed, by kind (``"speech"``, ``"image"``).

        A listed speech tower is only called as ``tower(wavs, lengths)`` and only its output's
        ``hidden_states`` and ``lengths`` are read; a listed image tower is only called as ``tower(pixels)``
        and only its output's ``pooled`` is read. Default: none.
        """
        return {}

    def set_tower(self, kind: str, module: nn.Module) -> None:
        """Replace the tower of ``kind`` (e.g. by a cached-feature stand-in with the same call contract)."""
        attribute = self.tower_attributes.get(kind)
        if attribute is None:
            valid = sorted(self.tower_attributes)
            raise ConfigError(
                f"{type(self).__name__} has no replaceable {kind!r} tower"
                + (f"; valid kinds are {valid}" if valid else "")
            )
        setattr(self, attribute, module)

    @classmethod
    def adapt_config_to_corpus(
        cls, config: dict[str, Any], train_texts: Sequence[str], *, model_name: str | None = None
    ) -> dict[str, Any]:
        """Complete a config (registry overrides, as in a recipe's ``model`` section) from the training data.

        Args:
            config: config overrides; a ``"name"`` key, if present, is the registry name (kept as is).
            train_texts: transcripts of the training captions (only models that need them read them).
            model_name: registry name the overrides apply to (its preset supplies the other values).

        Returns:
            The overrides to build the model with. Default: ``config`` unchanged.
        """
        return config


def image_transform_of(model: RetrievalModel) -> Any:
    """The :class:`vgskit.images.ImageTransform` described by ``model.image_transform``."""
    from vgskit.images import ImageTransform

    return ImageTransform.from_json(dict(model.image_transform))
