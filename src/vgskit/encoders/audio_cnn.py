"""A from-scratch 1-D convolutional speech encoder over log-mel features.

Layout: :class:`~vgskit.features.LogMel` → stem of stride-2 convolutions (cheap early downsampling is what
makes CPU training fast) → stages of pre-activation residual 1-D blocks (the first block of a stage may
downsample) → per-frame LayerNorm. No BatchNorm: see :mod:`vgskit.layers` for why every block is
padding- and batch-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.errors import ConfigError
from vgskit.features import LogMel, LogMelConfig
from vgskit.layers import (
    ChannelLayerNorm,
    ResBlock1d,
    SpeechEncoderOutput,
    conv1d_as_2d,
    conv_out_lengths,
    frame_mask,
)


@dataclass
class AudioCNNConfig:
    """Configuration of :class:`AudioCNNEncoder`.

    Attributes:
        features: log-mel front-end.
        stem_channels: widths of the stride-2 stem convolutions (one per entry; each halves the frame rate).
        stem_kernel: kernel size of the stem convolutions.
        channels: width of each residual stage.
        depths: residual blocks per stage.
        strides: stride of the first block of each stage.
        kernel_size: kernel size inside residual blocks.
        norm: per-frame LayerNorm in the stem and residual blocks; ``False`` uses norm-free residual blocks
            with zero-initialised gains (cheaper on CPU). A final per-frame LayerNorm is always applied.
    """

    features: LogMelConfig = field(default_factory=LogMelConfig)
    stem_channels: tuple[int, ...] = (64, 128)
    stem_kernel: int = 3
    channels: tuple[int, ...] = (128, 256)
    depths: tuple[int, ...] = (1, 1)
    strides: tuple[int, ...] = (1, 2)
    kernel_size: int = 3
    norm: bool = True

    def __post_init__(self) -> None:
        self.stem_channels = tuple(self.stem_channels)
        self.channels = tuple(self.channels)
        self.depths = tuple(self.depths)
        self.strides = tuple(self.strides)
        if not (len(self.channels) == len(self.depths) == len(self.strides)):
            raise ConfigError(
                f"AudioCNNConfig: channels {self.channels}, depths {self.depths} and strides {self.strides} "
                "must have the same length"
            )
        if isinstance(self.features, dict):
            self.features = LogMelConfig(**self.features)

    @property
    def width(self) -> int:
        """Dimension of the output frames."""
        if self.channels:
            return self.channels[-1]
        return self.stem_channels[-1] if self.stem_channels else self.features.n_mels


class AudioCNNEncoder(nn.Module):
    """Speech encoder: ``(wavs[B,T], lengths[B]) -> SpeechEncoderOutput`` with ``[B, T', D]`` frames.

    ``hidden_states`` holds the output of the stem and of every stage (each ``[B, T_l, D_l]``, padding zeroed).
    Internally sequences are ``[B, C, 1, T]`` channels-last tensors (see :mod:`vgskit.layers`).
    """

    def __init__(self, config: AudioCNNConfig | None = None):
        super().__init__()
        self.config = config = config or AudioCNNConfig()
        self.frontend = LogMel(config.features)
        self.stem = nn.ModuleList()
        self.stem_norms = nn.ModuleList()
        width = config.features.n_mels
        for out in config.stem_channels:
            self.stem.append(conv1d_as_2d(width, out, config.stem_kernel, 2))
            self.stem_norms.append(ChannelLayerNorm(out) if config.norm else nn.Identity())
            width = out
        self.stages = nn.ModuleList()
        for out, depth, stride in zip(config.channels, config.depths, config.strides, strict=True):
            blocks = nn.ModuleList()
            for i in range(depth):
                blocks.append(ResBlock1d(width, out, config.kernel_size, stride if i == 0 else 1, config.norm))
                width = out
            self.stages.append(blocks)
        self.final_norm = ChannelLayerNorm(width)
        self.width = width
        total_stride = 2 ** len(config.stem_channels)
        for s in config.strides:
            total_stride *= s
        self.frame_rate = self.frontend.frame_rate / total_stride

    @staticmethod
    def _frames(x: Tensor) -> Tensor:
        # [B, C, 1, T] channels-last -> [B, T, C] (a view, no copy)
        return x.squeeze(2).transpose(1, 2)

    def forward(self, wavs: Tensor, lengths: Tensor) -> SpeechEncoderOutput:
        # wavs: [B, T] float32 waveform at config.features.sample_rate; lengths: [B] samples
        feats, frames = self.frontend(wavs, lengths)  # [B, n_mels, N], [B]
        x = feats.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # [B, n_mels, 1, N]
        states: list[Tensor] = []
        k = self.config.stem_kernel
        for conv, norm in zip(self.stem, self.stem_norms, strict=True):
            x = conv(x)  # [B, C, 1, ceil(N / 2)]
            frames = conv_out_lengths(frames, k, 2, k // 2)
            # Zero the padding so the next conv sees the same context either way.
            x = F.gelu(norm(x)) * frame_mask(frames, x.shape[-1], x.dtype)
        if len(self.stem):
            states.append(self._frames(x))
        for blocks in self.stages:
            for block in blocks:
                x, frames = block(x, frames)  # [B, C, 1, T'], [B]
            states.append(self._frames(x))
        x = self.final_norm(x) * frame_mask(frames, x.shape[-1], x.dtype)  # [B, D, 1, T']
        return SpeechEncoderOutput(
            last_hidden_state=self._frames(x), lengths=frames, frame_rate=self.frame_rate, hidden_states=tuple(states)
        )
