"""CLIP's text and image towers, zero-shot: the other text tower of the transcription-based comparison.

The paper's cascade reads transcripts with a text tower trained on captions (:mod:`vgskit.models.milan.text`); a
user with CLIP's weights can put CLIP's own text tower there instead, with no training at all: ``clip_text_zero_shot``
reads transcripts (``speech_input = "text"``) with CLIP's text tower and images with CLIP's vision tower, both in
CLIP's joint space, L2-normalised. It is evaluated as built (``vgskit eval --model clip_text_zero_shot``) or put
behind a recogniser (``asr_cascade`` with ``text_model`` a saved copy of it: ``save_pretrained`` keeps the tower
names, so loading it again needs the same weights at hand).

    vgskit eval --model clip_text_zero_shot --manifest M --set text.name_or_path=openai/clip-vit-base-patch32 \\
        --set image.name_or_path=openai/clip-vit-base-patch32
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from vgskit.contract import Embeddings, SpeechInputs
from vgskit.encoders.pretrained_image import PretrainedImageConfig, PretrainedImageEncoder
from vgskit.encoders.text import ClipTextConfig, ClipTextEncoder
from vgskit.errors import ConfigError
from vgskit.models.base import RetrievalModel
from vgskit.models.registry import register_model

__all__ = ["ClipTextZeroShot", "ClipTextZeroShotConfig"]


@dataclass
class ClipTextZeroShotConfig:
    """The two CLIP towers (the same checkpoint, by default ViT-B/32)."""

    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    image: PretrainedImageConfig = field(default_factory=lambda: PretrainedImageConfig("clip-vit-b32"))

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = ClipTextConfig(**self.text)
        if isinstance(self.image, dict):
            self.image = PretrainedImageConfig(**self.image)
        self.text.freeze = self.image.freeze = True  # zero-shot: the towers are used as released
        self.image.project = True  # CLIP's joint space, where its text embeddings live


class ClipTextZeroShot(RetrievalModel):
    """CLIP text tower ⟷ CLIP vision tower, frozen (see the module docstring)."""

    config_class = ClipTextZeroShotConfig
    speech_input = "text"
    trainable = False

    def __init__(self, config: ClipTextZeroShotConfig | None = None):
        config = config or ClipTextZeroShotConfig()
        super().__init__(config)
        self.config: ClipTextZeroShotConfig = config
        self.text_tower = ClipTextEncoder(config.text)
        self.image_tower = PretrainedImageEncoder(config.image)
        if self.text_tower.tokenizer is None:
            raise ConfigError(f"clip_text_zero_shot: text tower {config.text.name_or_path!r} has no tokenizer files")
        self._image_transform = self.image_tower.transform.to_json()

    @property
    def embed_dim(self) -> int:
        return int(self.image_tower.width)

    @property
    def image_transform(self) -> dict[str, Any]:
        return dict(self._image_transform)

    def train(self, mode: bool = True) -> ClipTextZeroShot:
        return super().train(False)  # nothing trains; the towers keep their eval behaviour

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Unit CLIP text embeddings ``[B, P]`` of transcripts."""
        device = next(self.text_tower.parameters()).device
        ids, mask = self.text_tower.tokenize([str(t) for t in texts])  # [B, L], [B, L]
        return F.normalize(self.text_tower(ids.to(device), mask.to(device)).pooled, dim=-1)  # [B, P]

    def embed_speech(self, speech: SpeechInputs) -> Embeddings:
        if speech.kind != "text":
            raise ConfigError(f"clip_text_zero_shot reads transcripts (SpeechInputs of kind 'text'), got "
                              f"{speech.kind}; to search with speech, put an ASR in front of it (asr_cascade)")
        return Embeddings(self.encode_texts(speech.texts()))

    def encode_image(self, pixels: Tensor) -> Tensor:
        # pixels: [B, 3, S, S] normalised per image_transform
        return F.normalize(self.image_tower(pixels).pooled, dim=-1)  # [B, P]

    def step(self, batch: Any, state: Any) -> Any:
        raise ConfigError("clip_text_zero_shot has nothing to train")


register_model("clip_text_zero_shot")(ClipTextZeroShot)
