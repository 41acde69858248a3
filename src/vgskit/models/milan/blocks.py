"""MILAN audio encoders over frames: a ResNet-50-style 1-D CNN and the "shallow" three-layer CNN of Table 4.

Both read frames ``[B, T, F]`` with lengths ``[B]`` and return one vector per utterance (temporal pooling over
valid frames). Inside, sequences are ``[B, C, 1, T]`` in channels-last memory with ``(1, k)`` convolutions, as in
:mod:`vgskit.layers`, and frames past an utterance's length are zeroed before every convolution, so an
utterance gets the same embedding alone or padded in a batch.

Normalisation in the ResNet is a per-frame LayerNorm over channels rather than BatchNorm (our choice: the paper
does not say how its TPU ResNet-50 normalised; per-frame statistics never mix padding or other processes' rows,
which keeps multi-process training equal to one process without SyncBatchNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.errors import ConfigError
from vgskit.layers import ChannelLayerNorm, conv1d_as_2d, conv_out_lengths, frame_mask, lengths_to_mask

POOLINGS = ("mean", "max")


def _tuple(value: object) -> tuple[int, ...]:
    return tuple(int(v) for v in value)  # type: ignore[attr-defined]


def temporal_pool(x: Tensor, lengths: Tensor, mode: str) -> Tensor:
    """Masked mean or max over time of ``x [B, C, 1, T]`` → ``[B, C]``."""
    seq = x.squeeze(2)  # [B, C, T]
    mask = lengths_to_mask(lengths, seq.shape[-1]).unsqueeze(1)  # [B, 1, T]
    if mode == "max":
        return seq.masked_fill(~mask, float("-inf")).amax(dim=-1)  # [B, C]
    weights = mask.to(seq.dtype)
    return (seq * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1.0)  # [B, C]


@dataclass
class ResNet1dConfig:
    """A ResNet-50-style 1-D encoder (He et al. 2016, bottleneck blocks) over frames.

    Attributes:
        depths: bottleneck blocks per stage (ResNet-50: 3, 4, 6, 3; paper §3 "We use a ResNet50 CNN").
        widths: inner width of each stage's blocks (ResNet-50: 64, 128, 256, 512); a block outputs
            ``expansion ×`` its width (ResNet-50: 4, so 2,048 channels at the end).
        strides: temporal stride of each stage's first block (ResNet-50: 1, 2, 2, 2).
        expansion: bottleneck expansion.
        kernel_size: temporal kernel of the middle convolution of each block (ResNet-50: 3).
        stem_channels, stem_kernel, stem_stride: the first convolution (ResNet-50: 64 channels, 7, stride 2; our
            choice: no max-pool after it, so the encoder downsamples 100 frames/s to 6.25 frames/s).
        pool: temporal pooling of the last stage, ``"mean"`` or ``"max"`` over valid frames (our choice: mean,
            as ResNet's global average pooling).
    """

    depths: tuple[int, ...] = (3, 4, 6, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    expansion: int = 4
    kernel_size: int = 3
    stem_channels: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    pool: str = "mean"

    def __post_init__(self) -> None:
        self.depths, self.widths, self.strides = _tuple(self.depths), _tuple(self.widths), _tuple(self.strides)
        if not len(self.depths) == len(self.widths) == len(self.strides) or not self.depths:
            raise ConfigError(f"ResNet1dConfig: depths {self.depths}, widths {self.widths} and strides "
                              f"{self.strides} must have the same non-zero length")
        if min(self.depths) < 1 or min(self.widths) < 1 or min(self.strides) < 1 or self.expansion < 1:
            raise ConfigError("ResNet1dConfig: depths, widths, strides and expansion must be >= 1")
        if self.pool not in POOLINGS:
            raise ConfigError(f"ResNet1dConfig.pool must be one of {POOLINGS}, got {self.pool!r}")

    @property
    def out_channels(self) -> int:
        return self.widths[-1] * self.expansion


class Bottleneck1d(nn.Module):
    """ResNet bottleneck over ``[B, C, 1, T]``: 1×1 reduce → k conv (stride) → 1×1 expand, post-norm, ReLU.

    The last norm's gain starts at zero (Goyal et al. 2017), so each block starts as its shortcut.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm1 = ChannelLayerNorm(width)
        self.conv2 = conv1d_as_2d(in_channels=width, out_channels=width, kernel_size=kernel_size, stride=stride)
        self.norm2 = ChannelLayerNorm(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.norm3 = ChannelLayerNorm(out_channels)
        nn.init.zeros_(self.norm3.weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, (1, stride), bias=False),
                                          ChannelLayerNorm(out_channels))

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, C_in, 1, T] with zeros past lengths; lengths: [B]
        h = F.relu(self.norm1(self.conv1(x))) * frame_mask(lengths, x.shape[-1], x.dtype)  # [B, W, 1, T]
        h = self.conv2(h)  # [B, W, 1, T'] with T' = ceil(T / stride)
        out_lengths = conv_out_lengths(lengths, self.kernel_size, self.stride, self.kernel_size // 2)
        mask = frame_mask(out_lengths, h.shape[-1], h.dtype)  # [B, 1, 1, T']
        h = F.relu(self.norm2(h)) * mask
        h = self.norm3(self.conv3(h))  # [B, C_out, 1, T']
        return F.relu(self.shortcut(x) + h) * mask, out_lengths  # [B, C_out, 1, T'], [B]


class ResNet1d(nn.Module):
    """Frames ``[B, T, F]`` + lengths → pooled ``[B, expansion · widths[-1]]`` (see :class:`ResNet1dConfig`)."""

    def __init__(self, in_features: int, config: ResNet1dConfig):
        super().__init__()
        self.config = config
        self.stem = conv1d_as_2d(in_features, config.stem_channels, config.stem_kernel, config.stem_stride)
        self.stem_norm = ChannelLayerNorm(config.stem_channels)
        blocks: list[Bottleneck1d] = []
        channels = config.stem_channels
        for depth, width, stride in zip(config.depths, config.widths, config.strides, strict=True):
            for i in range(depth):
                out = width * config.expansion
                blocks.append(Bottleneck1d(channels, width, out, config.kernel_size, stride if i == 0 else 1))
                channels = out
        self.blocks = nn.ModuleList(blocks)
        self.width = channels

    def forward(self, frames: Tensor, lengths: Tensor) -> Tensor:
        # frames: [B, T, F] (zeros past lengths); lengths: [B] frames
        x = frames.transpose(1, 2).unsqueeze(2).contiguous(memory_format=torch.channels_last)  # [B, F, 1, T]
        cfg = self.config
        x = self.stem(x)  # [B, C_stem, 1, T / stem_stride]
        lengths = conv_out_lengths(lengths, cfg.stem_kernel, cfg.stem_stride, cfg.stem_kernel // 2)
        x = F.relu(self.stem_norm(x)) * frame_mask(lengths, x.shape[-1], x.dtype)
        for block in self.blocks:
            x, lengths = block(x, lengths)  # ... -> [B, 4·widths[-1], 1, T / (stem_stride · Π strides)]
        return temporal_pool(x, lengths, cfg.pool)  # [B, 4·widths[-1]]


@dataclass
class ShallowCNNConfig:
    """The three-layer CNN of Harwath, Torralba & Glass (NeurIPS 2016), the paper's "SHALLOW SPEECH ENC." (Table 4).

    Attributes:
        channels: filters of the three convolutions (Harwath et al. 2016: 64, 512, 1024; the first spans every
            input dimension of a frame).
        kernels: temporal widths (Harwath et al. 2016: 5, 25, 25 frames).
        pool_size, pool_stride: max-pooling after the first two convolutions (Harwath et al. 2016: 3, 2).
        pool: pooling over the whole utterance (Harwath et al. 2016: max).
    """

    channels: tuple[int, ...] = (64, 512, 1024)
    kernels: tuple[int, ...] = (5, 25, 25)
    pool_size: int = 3
    pool_stride: int = 2
    pool: str = "max"

    def __post_init__(self) -> None:
        self.channels, self.kernels = _tuple(self.channels), _tuple(self.kernels)
        if len(self.channels) != len(self.kernels) or not self.channels:
            raise ConfigError(f"ShallowCNNConfig: channels {self.channels} and kernels {self.kernels} must have "
                              "the same non-zero length")
        if self.pool not in POOLINGS:
            raise ConfigError(f"ShallowCNNConfig.pool must be one of {POOLINGS}, got {self.pool!r}")

    @property
    def out_channels(self) -> int:
        return self.channels[-1]


class ShallowCNN(nn.Module):
    """Frames ``[B, T, F]`` + lengths → pooled ``[B, channels[-1]]``: conv-ReLU-maxpool ×(n-1), conv-ReLU, pool."""

    def __init__(self, in_features: int, config: ShallowCNNConfig):
        super().__init__()
        self.config = config
        ins = (in_features, *config.channels[:-1])
        self.convs = nn.ModuleList(conv1d_as_2d(i, o, k) for i, o, k in zip(ins, config.channels, config.kernels,
                                                                          strict=True))
        self.width = config.channels[-1]

    def forward(self, frames: Tensor, lengths: Tensor) -> Tensor:
        # frames: [B, T, F] (zeros past lengths); lengths: [B] frames
        cfg = self.config
        x = frames.transpose(1, 2).unsqueeze(2).contiguous(memory_format=torch.channels_last)  # [B, F, 1, T]
        for i, conv in enumerate(self.convs):
            # ReLU outputs are >= 0 and padding is zeroed, so max-pooling windows that reach into the padding
            # see the same maximum as without it.
            x = F.relu(conv(x)) * frame_mask(lengths, x.shape[-1], x.dtype)  # [B, C_i, 1, T_i]
            if i < len(self.convs) - 1:
                pad = cfg.pool_size // 2
                x = F.max_pool2d(x, (1, cfg.pool_size), (1, cfg.pool_stride), (0, pad))  # [B, C_i, 1, T_i / 2]
                lengths = conv_out_lengths(lengths, cfg.pool_size, cfg.pool_stride, pad)
                x = x * frame_mask(lengths, x.shape[-1], x.dtype)
        return temporal_pool(x, lengths, cfg.pool)  # [B, channels[-1]]
