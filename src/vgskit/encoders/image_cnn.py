"""A small from-scratch convolutional image encoder.

Layout: 3×3 stride-2 stem → stages of pre-activation residual 2-D blocks with GroupNorm (per-sample
statistics, so results do not depend on how a batch is split across processes) → GroupNorm + GELU.
Returns the final feature map as row-major patch tokens and their global average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.errors import ConfigError
from vgskit.layers import ImageEncoderOutput, ResBlock2d


@dataclass
class ImageCNNConfig:
    """Configuration of :class:`ImageCNNEncoder`.

    Attributes:
        image_size: expected input side (square); only used to report the token count.
        in_channels: input channels (3 for RGB).
        stem_channels: width of the stride-2 stem convolution.
        channels: width of each residual stage.
        depths: residual blocks per stage.
        strides: stride of the first block of each stage.
        groups: GroupNorm groups (clipped to the channel count).
    """

    image_size: int = 64
    in_channels: int = 3
    stem_channels: int = 24
    channels: tuple[int, ...] = (48, 96, 192)
    depths: tuple[int, ...] = (1, 1, 1)
    strides: tuple[int, ...] = (2, 2, 2)
    groups: int = 8

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        self.depths = tuple(self.depths)
        self.strides = tuple(self.strides)
        if not (len(self.channels) == len(self.depths) == len(self.strides)):
            raise ConfigError(
                f"ImageCNNConfig: channels {self.channels}, depths {self.depths} and strides {self.strides} "
                "must have the same length"
            )

    @property
    def width(self) -> int:
        """Dimension of tokens and of the pooled vector."""
        return self.channels[-1] if self.channels else self.stem_channels

    @property
    def num_tokens(self) -> int:
        """Tokens per image at ``image_size``."""
        side = (self.image_size + 1) // 2
        for s in self.strides:
            side = (side - 1) // s + 1
        return side * side


class ImageCNNEncoder(nn.Module):
    """Image encoder: ``pixels[B,3,H,W] -> ImageEncoderOutput(tokens[B,N,D], pooled[B,D])``."""

    def __init__(self, config: ImageCNNConfig | None = None):
        super().__init__()
        self.config = config = config or ImageCNNConfig()
        self.stem = nn.Conv2d(config.in_channels, config.stem_channels, 3, 2, 1)
        width = config.stem_channels
        blocks: list[nn.Module] = []
        for out, depth, stride in zip(config.channels, config.depths, config.strides, strict=True):
            for i in range(depth):
                blocks.append(ResBlock2d(width, out, stride if i == 0 else 1, config.groups))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = nn.GroupNorm(min(config.groups, width), width)
        self.width = width

    def forward(self, pixels: Tensor) -> ImageEncoderOutput:
        # pixels: [B, 3, H, W], normalised
        # channels-last activations make oneDNN convolutions several times faster on CPU
        x = self.stem(pixels.contiguous(memory_format=torch.channels_last))  # [B, C0, H/2, W/2]
        x = self.blocks(x)  # [B, D, h, w]
        x = F.gelu(self.final_norm(x))
        tokens = x.flatten(2).transpose(1, 2)  # [B, h*w, D]
        return ImageEncoderOutput(tokens=tokens, pooled=tokens.mean(dim=1))
