"""MILAN's text dual encoder: captions' words ⟷ images, the tower the speech → ASR → text cascade reads with.

Sanabria et al. (Interspeech 2021, §4 "Transcription-based Comparison", Tables 5–6) compare encoding speech
directly with transcribing it and encoding the text: "a text tower ... [that] computes per-word, contextualized
BERT embeddings and inputs these to a 3-layer transformer stack", trained with the same EfficientNet image tower
and the same loss as the speech dual encoder. Here the tower reads learnt subword embeddings
(:mod:`vgskit.models.milan.tokenizer`: BPE merges learnt from the training captions, stored in the config)
instead of BERT's, since BERT's weights are not available offline; a ``transformer_layers``-deep pre-norm
transformer over them (3, the paper's), mean-pooled over the caption's units and projected to the shared space.

The model's ``speech_input`` is ``"text"``: the data pipeline serves each caption's transcript (the manifest's
``text``) as :class:`~vgskit.contract.SpeechInputs` of kind ``text``, so the generic trainer trains it on the
written captions and the generic evaluator evaluates it on them — the ground-truth-text row of Table 5. The
cascade (:mod:`vgskit.models.milan.cascade`) feeds it ASR transcripts instead.

Train (the merges are learnt from the training split's captions when the run starts)::

    vgskit train --recipe milan_text_flickr8k --out runs/milan_text --manifest flickr8k.jsonl
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.contract import Embeddings, SpeechInputs
from vgskit.encoders.efficientnet import LITE0_TRANSFORM
from vgskit.encoders.image_cnn import ImageCNNConfig
from vgskit.errors import ConfigError
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD
from vgskit.losses import InfoNCELoss
from vgskit.models.base import InBatchSoftmaxStep, RetrievalModel
from vgskit.models.milan.model import ImageTowerConfig, build_image_tower
from vgskit.models.milan.tokenizer import BPETokenizer, learn_bpe
from vgskit.models.registry import register_model

__all__ = ["MilanText", "MilanTextConfig", "TextTower"]


@dataclass
class MilanTextConfig:
    """Configuration of :class:`MilanText`.

    Attributes:
        chars, merges: the subword units (characters and BPE merges ``"a b"``); empty until
            :meth:`MilanText.adapt_config_to_corpus` learns them from the training captions.
        num_merges, min_frequency: how many merges to learn, and the least frequency a merge needs.
        width, transformer_layers, heads, ffn_width, dropout: the transformer (3 layers: the paper's).
        max_units: captions are cut to this many subword units (longer ones are rare in caption corpora).
        image: the image tower (MILAN's EfficientNet by default).
        embed_dim, init_temperature, learnable_temperature, max_logit_scale: as :class:`MilanConfig`.
    """

    chars: list[str] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    num_merges: int = 8000
    min_frequency: int = 2
    width: int = 512
    transformer_layers: int = 3
    heads: int = 8
    ffn_width: int = 2048
    dropout: float = 0.1
    max_units: int = 128
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    embed_dim: int = 512
    init_temperature: float = 0.07
    learnable_temperature: bool = True
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.image, dict):
            self.image = ImageTowerConfig(**self.image)
        self.chars, self.merges = list(self.chars), list(self.merges)
        for name in ("num_merges", "width", "transformer_layers", "heads", "ffn_width", "max_units", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "num_merges" else 1):
                raise ConfigError(f"MilanTextConfig.{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ConfigError(f"MilanTextConfig: width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MilanTextConfig.dropout must be in [0, 1), got {self.dropout!r}")


class TextTower(nn.Module):
    """Subword ids ``[B, L]`` (0 = padding) → mean-pooled transformer states ``[B, width]``."""

    def __init__(self, vocab_size: int, config: MilanTextConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.width, padding_idx=0)
        self.position = nn.Embedding(config.max_units, config.width)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, config.ffn_width, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor off: the fast path would change results between train and eval batches.
        self.encoder = nn.TransformerEncoder(layer, config.transformer_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.width = config.width

    def forward(self, ids: Tensor) -> Tensor:
        # ids: [B, L] subword ids, 0 = padding; rows with no unit at all keep one padding position valid
        valid = ids != 0  # [B, L]
        valid[:, 0] |= ~valid.any(dim=1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position(positions)[None]  # [B, L, W]
        x = self.norm(self.encoder(x, src_key_padding_mask=~valid))  # [B, L, W]
        weights = valid.to(x.dtype)[..., None]  # [B, L, 1]
        return (x * weights).sum(dim=1) / weights.sum(dim=1)  # [B, W]


class MilanText(InBatchSoftmaxStep, RetrievalModel):
    """Text ⟷ image dual encoder (see the module docstring); reads transcripts (``speech_input = "text"``)."""

    config_class = MilanTextConfig
    speech_input = "text"
    tower_attributes: ClassVar[Mapping[str, str]] = {"image": "image_tower"}

    def __init__(self, config: MilanTextConfig | None = None):
        config = config or MilanTextConfig()
        super().__init__(config)
        self.config: MilanTextConfig = config
        self.tokenizer = BPETokenizer(config.chars, config.merges)
        self.text_tower = TextTower(self.tokenizer.vocab_size, config)
        self.image_tower = build_image_tower(config.image)
        self.text_proj = nn.Linear(config.width, config.embed_dim)
        self.image_proj = nn.Linear(int(self.image_tower.width), config.embed_dim)
        self.loss = InfoNCELoss(init_temperature=config.init_temperature,
                                learnable_temperature=config.learnable_temperature,
                                max_logit_scale=config.max_logit_scale)

    @classmethod
    def adapt_config_to_corpus(cls, config: dict[str, Any], train_texts: Sequence[str], *,
                               model_name: str | None = None,
                               corpus_texts: Sequence[str] | None = None) -> dict[str, Any]:
        """Learn the subword units from the training captions (unless the config already has them)."""
        if config.get("merges") or config.get("chars"):
            return config
        from vgskit.models.registry import model_config

        preset = model_config(model_name) if model_name else MilanTextConfig()
        num_merges = int(config.get("num_merges", getattr(preset, "num_merges", 8000)))
        min_frequency = int(config.get("min_frequency", getattr(preset, "min_frequency", 2)))
        texts = [t for t in train_texts if t]
        if not texts:
            raise ConfigError("milan_text: the training captions have no transcripts ('text') to learn subword "
                              "units from")
        chars, merges = learn_bpe(texts, num_merges, min_frequency)
        return {**config, "chars": chars, "merges": merges}

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        image = self.config.image
        mean, std = ((LITE0_TRANSFORM.mean, LITE0_TRANSFORM.std) if image.kind == "efficientnet_lite0"
                     else (IMAGENET_MEAN, IMAGENET_STD))
        return {"size": image.image_size, "mean": list(mean), "std": list(std), "resize_mode": "squash",
                "interpolation": "bicubic"}

    def frozen_towers(self) -> dict[str, nn.Module]:
        return {"image": self.image_tower} if self.config.image.freeze else {}

    def train(self, mode: bool = True) -> MilanText:
        super().train(mode)
        for tower in self.frozen_towers().values():
            tower.eval()
        return self

    def token_ids(self, texts: Sequence[str]) -> Tensor:
        """Subword ids ``[B, L]`` of ``texts`` (zero-padded; at most ``max_units`` each, at least one column)."""
        rows = [self.tokenizer.encode(t)[: self.config.max_units] for t in texts]
        ids = torch.zeros(len(rows), max([len(r) for r in rows] + [1]), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Unit text embeddings ``[B, E]`` of transcripts."""
        device = self.text_proj.weight.device
        pooled = self.text_tower(self.token_ids(texts).to(device))  # [B, W]
        return F.normalize(self.text_proj(pooled), dim=-1)  # [B, E]

    def embed_speech(self, speech: SpeechInputs) -> Embeddings:
        if speech.kind != "text":
            raise ConfigError(f"milan_text reads transcripts (SpeechInputs of kind 'text'), got {speech.kind}; "
                              "to search with speech, put an ASR in front of it (model asr_cascade)")
        return Embeddings(self.encode_texts(speech.texts()))

    def encode_image(self, pixels: Tensor) -> Tensor:
        # pixels: [B, 3, S, S] (or, under a feature cache, the cached pooled tower outputs [B, D_i])
        return F.normalize(self.image_proj(self.image_tower(pixels).pooled), dim=-1)  # [B, E]


register_model("milan_text")(MilanText)
register_model(
    "milan_text_small",
    config=MilanTextConfig(
        num_merges=1000, width=128, transformer_layers=3, heads=4, ffn_width=256, dropout=0.1, max_units=64,
        image=ImageTowerConfig(kind="cnn", weights=None, image_size=64,
                               cnn=ImageCNNConfig(image_size=64, stem_channels=16, channels=(32, 64), depths=(1, 1),
                                                  strides=(2, 2))),
        embed_dim=64,
    ),
)(MilanText)
