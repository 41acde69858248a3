"""A compact from-scratch dual encoder: 1-D CNN over log-mel ⟷ small image CNN, trained with masked InfoNCE.

Presets:

* ``dual_encoder`` — 1.26 M parameters, sized for CPU training: a training step (forward, backward, Adam) at
  batch 128 on 3–5 s captions runs at about 460 captions/s on two threads with 64×64 images, and about
  280 captions/s with the 96×96 images and max pooling of the ``demo`` recipe (about 370 with its bf16
  autocast and one caption per image). The speech tower reaches
  12.5 frames/s after two stride-2 stem convolutions and two residual stages;
* ``dual_encoder_tiny`` — a few thousand parameters, for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.encoders.audio_cnn import AudioCNNConfig, AudioCNNEncoder
from vgskit.encoders.image_cnn import ImageCNNConfig, ImageCNNEncoder
from vgskit.errors import ConfigError
from vgskit.features import LogMelConfig
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD
from vgskit.layers import AttentionPool1d, lengths_to_mask, masked_mean
from vgskit.losses import InfoNCELoss
from vgskit.models.base import InBatchSoftmaxStep, RetrievalModel
from vgskit.models.registry import register_model

POOLINGS = ("mean", "attention", "max")
IMAGE_POOLINGS = ("mean", "max", "flatten")


@dataclass
class DualEncoderConfig:
    """Configuration of :class:`DualEncoder`.

    Attributes:
        audio: speech encoder config.
        image: image encoder config (``image.image_size`` is the input side the model expects).
        embed_dim: shared embedding dimension.
        audio_pool: ``"mean"`` (masked mean over valid frames), ``"attention"`` (masked attention pooling) or
            ``"max"`` (masked max over valid frames: a feature is present if any frame has it).
        audio_pool_heads: attention-pooling heads; their outputs are concatenated before the projection.
        audio_context_layers: pre-norm Transformer layers (sinusoidal positions, masked self-attention) over
            the CNN frames before pooling. The CNN alone sees about half a second, so a pooled embedding is
            close to a bag of words; captions that bind colours to objects and relate objects ("a red bag
            left of a blue coat") need context across the whole utterance.
        audio_context_heads, audio_context_ffn, audio_context_dropout: size of those layers.
        image_pool: ``"mean"`` (global average of the CNN tokens), ``"max"`` (global max: small objects on a
            large background are not averaged away) or ``"flatten"`` (concatenate the token grid before the
            projection, which keeps where things are).
        init_temperature: initial softmax temperature of the loss.
        learnable_temperature: learn the temperature (log-parametrised) or keep it fixed.
        max_logit_scale: clamp on ``1/temperature``.
        image_mean: per-channel mean used to normalise pixels in [0, 1].
        image_std: per-channel std used to normalise pixels in [0, 1].
    """

    audio: AudioCNNConfig = field(default_factory=AudioCNNConfig)
    image: ImageCNNConfig = field(default_factory=ImageCNNConfig)
    embed_dim: int = 256
    audio_pool: str = "mean"
    audio_pool_heads: int = 1
    audio_context_layers: int = 0
    audio_context_heads: int = 4
    audio_context_ffn: int = 512
    audio_context_dropout: float = 0.0
    image_pool: str = "mean"
    init_temperature: float = 0.07
    learnable_temperature: bool = True
    max_logit_scale: float = 100.0
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Configs read back from JSON arrive as plain dicts/lists.
        if isinstance(self.audio, dict):
            self.audio = AudioCNNConfig(**self.audio)
        if isinstance(self.image, dict):
            self.image = ImageCNNConfig(**self.image)
        self.image_mean = tuple(float(v) for v in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(v) for v in self.image_std)  # type: ignore[assignment]
        if self.audio_pool not in POOLINGS:
            raise ConfigError(f"DualEncoderConfig.audio_pool must be one of {POOLINGS}, got {self.audio_pool!r}")
        if self.image_pool not in IMAGE_POOLINGS:
            raise ConfigError(
                f"DualEncoderConfig.image_pool must be one of {IMAGE_POOLINGS}, got {self.image_pool!r}")
        if self.audio_pool_heads < 1:
            raise ConfigError(f"DualEncoderConfig.audio_pool_heads must be >= 1, got {self.audio_pool_heads}")
        if self.audio_pool_heads > 1 and self.audio_pool != "attention":
            raise ConfigError(
                f"DualEncoderConfig.audio_pool_heads={self.audio_pool_heads} needs audio_pool='attention', "
                f"got {self.audio_pool!r}")
        if self.audio_context_layers < 0:
            raise ConfigError(
                f"DualEncoderConfig.audio_context_layers must be >= 0, got {self.audio_context_layers}")
        if self.embed_dim <= 0:
            raise ConfigError(f"DualEncoderConfig.embed_dim must be positive, got {self.embed_dim}")


class DualEncoder(InBatchSoftmaxStep, RetrievalModel):
    """Two towers + linear projections to a shared space + :class:`~vgskit.losses.InfoNCELoss`.

    Reads waveforms and pixels; its step (:class:`~vgskit.models.base.InBatchSoftmaxStep`) encodes each distinct
    image of the batch once (captions of the same image share an id) and returns one loss, ``infonce``.
    """

    config_class = DualEncoderConfig

    def __init__(self, config: DualEncoderConfig | None = None):
        config = config or DualEncoderConfig()
        super().__init__(config)
        self.config: DualEncoderConfig = config
        self.sample_rate = config.audio.features.sample_rate
        self.audio_encoder = AudioCNNEncoder(config.audio)
        self.image_encoder = ImageCNNEncoder(config.image)
        width = self.audio_encoder.width
        self.audio_context = nn.ModuleList(
            nn.TransformerEncoderLayer(width, config.audio_context_heads, config.audio_context_ffn,
                                       config.audio_context_dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(config.audio_context_layers))
        self.audio_pool = (AttentionPool1d(width, config.audio_pool_heads) if config.audio_pool == "attention"
                           else None)
        self.audio_proj = nn.Linear(width * config.audio_pool_heads, config.embed_dim)
        image_in = self.image_encoder.width
        if config.image_pool == "flatten":
            image_in *= config.image.num_tokens
        self.image_proj = nn.Linear(image_in, config.embed_dim)
        self.loss = InfoNCELoss(
            init_temperature=config.init_temperature,
            learnable_temperature=config.learnable_temperature,
            max_logit_scale=config.max_logit_scale,
        )

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        # Whole-image resize (no crop): synthetic scenes place objects anywhere, a centre crop would cut them.
        return {
            "size": self.config.image.image_size,
            "mean": list(self.config.image_mean),
            "std": list(self.config.image_std),
            "resize_mode": "squash",
            "interpolation": "bilinear",
        }

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        # wavs: [B, T]; lengths: [B]
        out = self.audio_encoder(wavs, lengths)
        frames = out.last_hidden_state  # [B, T', D_a]
        mask = lengths_to_mask(out.lengths, frames.shape[1])  # [B, T']
        if len(self.audio_context):
            frames = frames + sinusoidal_positions(frames.shape[1], frames.shape[2], frames)  # [B, T', D_a]
            for layer in self.audio_context:
                frames = layer(frames, src_key_padding_mask=~mask)  # [B, T', D_a]
        if self.audio_pool is not None:
            pooled = self.audio_pool(frames, mask)  # [B, H * D_a]
        elif self.config.audio_pool == "max":
            pooled = frames.masked_fill(~mask[:, :, None], float("-inf")).amax(dim=1)  # [B, D_a]
        else:
            pooled = masked_mean(frames, mask)  # [B, D_a]
        return F.normalize(self.audio_proj(pooled), dim=-1)  # [B, E]

    def encode_image(self, pixels: Tensor) -> Tensor:
        # pixels: [B, 3, S, S]
        out = self.image_encoder(pixels)
        if self.config.image_pool == "flatten":
            pooled = out.tokens.flatten(1)  # [B, N * D_i], row-major over the token grid
        elif self.config.image_pool == "max":
            pooled = out.tokens.amax(dim=1)  # [B, D_i]
        else:
            pooled = out.pooled  # [B, D_i]
        return F.normalize(self.image_proj(pooled), dim=-1)  # [B, E]


def sinusoidal_positions(length: int, dim: int, like: Tensor) -> Tensor:
    """Fixed sine/cosine position codes ``[length, dim]`` (Vaswani et al.), in ``like``'s dtype and device."""
    pos = torch.arange(length, device=like.device, dtype=torch.float32)[:, None]  # [T, 1]
    inv = torch.exp(torch.arange(0, dim, 2, device=like.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=like.device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table.to(like.dtype)


register_model("dual_encoder")(DualEncoder)
register_model(
    "dual_encoder_tiny",
    config=DualEncoderConfig(
        audio=AudioCNNConfig(
            features=LogMelConfig(n_mels=20),
            stem_channels=(16,),
            channels=(24,),
            depths=(1,),
            strides=(2,),
        ),
        image=ImageCNNConfig(image_size=32, stem_channels=8, channels=(16, 24), depths=(1, 1), strides=(2, 2)),
        embed_dim=32,
    ),
)(DualEncoder)
