"""Small building blocks shared by encoders and models, and the encoder output contracts.

Every sequence block here is *padding-invariant*: frames past an utterance's length are zeroed before each
convolution and normalisation is per frame (over channels), never over time or over the batch. An utterance
therefore gets the same embedding alone or padded inside a batch, and multi-process training on a split
global batch equals single-process training on the whole batch (no batch statistics anywhere).

Layout of sequences inside encoders: ``[B, C, 1, T]`` in ``torch.channels_last`` memory format (i.e. stored
as ``[B, T, C]``), and 1-D convolutions are ``nn.Conv2d`` with ``(1, k)`` kernels. On CPU, oneDNN runs these
about five times faster than ``nn.Conv1d`` on ``[B, C, T]`` (forward + backward), and the per-frame
LayerNorm then normalises the innermost memory dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SpeechEncoderOutput:
    """What every speech encoder returns for ``(wavs[B,T], lengths[B])``.

    Attributes:
        last_hidden_state: ``[B, T', D]`` frames of the last layer; frames ``>= lengths[b]`` are zero.
        lengths: ``[B]`` number of valid frames per utterance (long).
        frame_rate: frames per second of ``last_hidden_state`` (e.g. 12.5 for 80 ms frames).
        hidden_states: optional per-layer states, each ``[B, T_l, D_l]`` (their lengths and rates may differ from
            the last layer's when layers downsample; ``None`` when the encoder does not expose them).
    """

    last_hidden_state: Tensor
    lengths: Tensor
    frame_rate: float
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class ImageEncoderOutput:
    """What every image encoder returns for ``pixels[B,3,H,W]``.

    Attributes:
        tokens: ``[B, N, D]`` patch/region tokens (row-major over the final feature map for CNNs).
        pooled: ``[B, D]`` one global vector per image.
    """

    tokens: Tensor
    pooled: Tensor


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """Boolean mask ``[B, max_len]``, True on valid positions (``t < lengths[b]``)."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def conv_out_lengths(lengths: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """Valid output frames of a 1-D convolution for inputs with ``lengths`` valid frames.

    Same formula as the output size of ``nn.Conv1d``, applied per utterance; at least one frame is kept so
    pooling never divides by zero.
    """
    out = torch.div(lengths + 2 * padding - kernel_size, stride, rounding_mode="floor") + 1
    return out.clamp(min=1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [B, T, D]`` over valid positions of ``mask [B, T]`` → ``[B, D]``."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
    count = weights.sum(dim=1).clamp(min=1.0)  # [B, 1]
    return (x * weights).sum(dim=1) / count


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels (dim 1) of a ``[B, C, ...]`` tensor, independently at every position.

    Used instead of BatchNorm/GroupNorm on sequences: statistics over time would mix in padded frames, and
    statistics over the batch would differ between one process and several. With channels-last inputs the
    permutes are free views and the fused ``layer_norm`` kernel runs on contiguous memory.
    """

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, C, ...] -> same shape
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def frame_mask(lengths: Tensor, max_len: int, dtype: torch.dtype) -> Tensor:
    """Float mask ``[B, 1, 1, max_len]`` for ``[B, C, 1, T]`` sequences (1 on valid frames)."""
    return lengths_to_mask(lengths, max_len).to(dtype)[:, None, None, :]


def conv1d_as_2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """A 1-D convolution over ``[B, C, 1, T]`` with ``kernel_size // 2`` zero padding (see module docstring)."""
    return nn.Conv2d(in_channels, out_channels, (1, kernel_size), (1, stride), (0, kernel_size // 2))


class ResBlock1d(nn.Module):
    """Pre-activation residual block over sequences ``[B, C, 1, T]`` with frame masking.

    The first convolution may downsample (``stride > 1``) and change the width; the shortcut then uses a
    strided 1×1 convolution so both branches have the same length.

    ``norm=True`` puts a per-frame LayerNorm before each activation (the residual branch starts at zero
    through a zero-initialised last convolution). ``norm=False`` is the cheaper *norm-free* variant: the
    branch is scaled by a learnable scalar gain initialised to zero (ReZero/SkipInit), which keeps a deep
    stack close to the identity at initialisation without normalisation layers.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, norm: bool = True
    ):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.norm1 = ChannelLayerNorm(in_channels) if norm else None
        self.conv1 = conv1d_as_2d(in_channels, out_channels, kernel_size, stride)
        self.norm2 = ChannelLayerNorm(out_channels) if norm else None
        self.conv2 = conv1d_as_2d(out_channels, out_channels, kernel_size)
        self.shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1, (1, stride))
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.gain: nn.Parameter | None
        if norm:
            self.gain = None
            nn.init.zeros_(self.conv2.weight)
        else:
            self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, C_in, 1, T] with zeros past lengths; lengths: [B]
        if self.norm1 is not None:
            # The norm maps zero padding to a non-zero value; re-zero it so the conv sees the same
            # neighbourhood whether or not the utterance is padded.
            h = F.gelu(self.norm1(x)) * frame_mask(lengths, x.shape[-1], x.dtype)
        else:
            h = F.gelu(x)  # gelu(0) = 0: padding stays zero, no mask needed
        h = self.conv1(h)  # [B, C_out, 1, T']
        out_lengths = conv_out_lengths(lengths, self.kernel_size, self.stride, self.padding)
        mask = frame_mask(out_lengths, h.shape[-1], h.dtype)  # [B, 1, 1, T']
        h = F.gelu(self.norm2(h) if self.norm2 is not None else h) * mask
        h = self.conv2(h)
        if self.gain is not None:
            h = h * self.gain
        y = (self.shortcut(x) + h) * mask  # [B, C_out, 1, T'], padding zeroed again
        return y, out_lengths


class ResBlock2d(nn.Module):
    """Pre-activation residual block over ``[B, C, H, W]`` with GroupNorm (per-sample statistics)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.norm2 = nn.GroupNorm(min(groups, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        # The projection shortcut is a 1x1 convolution with stride ``stride``, computed as the stride-1 convolution
        # of the subsampled input (the same weights and the same numbers): torch 2.14's CPU backward of a strided
        # 1x1 convolution over channels-last input corrupts memory for some batch sizes with more than one thread
        # (a crash, measured with 11 images of 16x16 on 2 threads).
        self.shortcut_stride = stride
        self.shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, C_in, H, W] -> [B, C_out, H/stride, W/stride]
        h = self.conv1(F.gelu(self.norm1(x)))
        h = self.conv2(F.gelu(self.norm2(h)))
        s = self.shortcut_stride
        return self.shortcut(x[:, :, ::s, ::s] if s != 1 else x) + h


class AttentionPool1d(nn.Module):
    """Masked attention pooling: learned scores per frame, softmax over valid frames, weighted sums.

    With ``heads > 1`` each head has its own scores and the weighted sums are concatenated, so one utterance
    that names several things can keep each of them instead of averaging them into one vector.
    Input ``x [B, T, D]`` and ``mask [B, T]``; output ``[B, heads * D]``.
    """

    def __init__(self, dim: int, heads: int = 1):
        super().__init__()
        if heads < 1:
            raise ValueError(f"AttentionPool1d: heads must be >= 1, got {heads}")
        self.heads = heads
        self.score = nn.Linear(dim, heads)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # x: [B, T, D]; mask: [B, T]
        scores = self.score(x)  # [B, T, H]
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        weights = scores.softmax(dim=1)  # [B, T, H]
        return torch.einsum("bth,btd->bhd", weights, x).flatten(1)  # [B, H * D]
