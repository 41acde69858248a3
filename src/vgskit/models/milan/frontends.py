"""MILAN speech front-ends: what the audio tower reads, as frames ``[B, T, F]`` at a fixed frame rate.

Sanabria et al. (Interspeech 2021, §3 and §4) compare three inputs of the ResNet-50 audio encoder:

* ``mfcc`` — the "standard MFCC frontend (128d frames extracted from 20ms windows every 10ms)" of Table 4:
  128 log-mel bands of 20 ms Hann windows every 10 ms, then a DCT-II (orthonormal) over the bands, keeping
  ``n_mfcc`` coefficients (all 128 by default, so the paper's 128-d frames). :func:`mfcc` is the pure function.
* ``fbank`` — the same log-mel filterbank frames without the DCT (the "frequency band spectrograms" of prior work).
* ``tower`` — frame states of a self-supervised speech model, layer ``tower_layer``, computed in the model by a
  frozen :class:`~vgskit.encoders.pretrained_speech.PretrainedSpeechEncoder` (wav2vec2 or HuBERT through
  transformers, 50 frames/s). Its outputs can be precomputed with the generic frozen-feature cache (``data.
  feature_cache``); batches then carry ``SpeechInputs`` of kind ``tower_states`` and the tower is replaced by
  the cache's reader.
* ``features`` — frame features computed elsewhere, read as ``SpeechInputs`` of kind ``features`` ``[B, T, F]``
  (``feature_dim`` wide, ``feature_rate`` frames/s). The paper's best input, CPC-8K (Kawakami et al. 2020: 1024-d
  every 10 ms, over 20 s windows), was given to the authors and its weights are not public; any 10 ms-rate (or
  20 ms-rate) feature file fits here instead.

Every front-end returns frames and their valid lengths; frames past an utterance's length are zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig
from vgskit.errors import ConfigError
from vgskit.features import LogMel, LogMelConfig
from vgskit.layers import lengths_to_mask

FRONTENDS = ("mfcc", "fbank", "tower", "features")


def dct_ii_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal DCT-II basis ``[n_in, n_out]``: ``x @ D`` gives the first ``n_out`` coefficients of ``x [..., n_in]``.

    ``D[n, k] = s_k · cos(π k (2n + 1) / (2 n_in))`` with ``s_0 = sqrt(1/n_in)`` and ``s_k = sqrt(2/n_in)``
    otherwise (``scipy.fft.dct(x, type=2, norm="ortho")``; with ``n_out = n_in`` the matrix is orthogonal).
    """
    if not 1 <= n_out <= n_in:
        raise ConfigError(f"dct_ii_matrix: need 1 <= n_out <= n_in, got n_in={n_in}, n_out={n_out}")
    n = torch.arange(n_in, dtype=torch.float64)[:, None]  # [N, 1]
    k = torch.arange(n_out, dtype=torch.float64)[None, :]  # [1, K]
    basis = torch.cos(math.pi * k * (2.0 * n + 1.0) / (2.0 * n_in)) * math.sqrt(2.0 / n_in)  # [N, K]
    basis[:, 0] = math.sqrt(1.0 / n_in)
    return basis.to(dtype)


def mfcc(log_mel: Tensor, n_mfcc: int, dim: int = -1) -> Tensor:
    """MFCCs of log-mel energies: the orthonormal DCT-II of ``log_mel`` along ``dim``, first ``n_mfcc`` kept."""
    x = log_mel.movedim(dim, -1)  # [..., M]
    basis = dct_ii_matrix(x.shape[-1], n_mfcc, dtype=x.dtype).to(x.device)  # [M, K]
    return (x @ basis).movedim(-1, dim)


@dataclass
class FrontendConfig:
    """Configuration of :class:`MilanFrontend`.

    Attributes:
        kind: one of :data:`FRONTENDS` (see the module docstring).
        n_mels: log-mel bands (``mfcc``, ``fbank``); paper Table 4: 128-d frames.
        n_mfcc: cepstral coefficients kept (``mfcc``); 128 keeps them all.
        window_ms: analysis window (paper Table 4: 20 ms).
        hop_ms: frame step (paper §4 and Table 4: 10 ms).
        sample_rate: waveform rate in Hz.
        f_min, f_max: band edges of the mel filterbank (our choice: 20 Hz to Nyquist).
        normalize: per-utterance mean/variance normalisation of each dimension over valid frames (our choice).
        tower: the frozen self-supervised tower (``tower``); ``freeze`` is forced on.
        tower_layer: which hidden state feeds the audio encoder (0 is the transformer input; ``-1`` the last).
        feature_dim: width of precomputed ``features`` (CPC-8K: 1024).
        feature_rate: frames per second of precomputed ``features`` (CPC-8K: 100).
    """

    kind: str = "mfcc"
    n_mels: int = 128
    n_mfcc: int = 128
    window_ms: float = 20.0
    hop_ms: float = 10.0
    sample_rate: int = 16000
    f_min: float = 20.0
    f_max: float = 8000.0
    normalize: bool = True
    tower: PretrainedSpeechConfig | None = None
    tower_layer: int = -1
    feature_dim: int = 1024
    feature_rate: float = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.tower, dict):
            self.tower = PretrainedSpeechConfig(**self.tower)
        if self.kind not in FRONTENDS:
            raise ConfigError(f"FrontendConfig.kind must be one of {FRONTENDS}, got {self.kind!r}")
        if self.kind == "tower" and self.tower is None:
            raise ConfigError("FrontendConfig.kind 'tower' needs frontend.tower (a PretrainedSpeechConfig)")
        if self.kind == "mfcc" and not 1 <= self.n_mfcc <= self.n_mels:
            raise ConfigError(f"FrontendConfig.n_mfcc must be in [1, n_mels={self.n_mels}], got {self.n_mfcc}")
        if self.hop_ms <= 0 or self.window_ms < self.hop_ms:
            raise ConfigError(f"FrontendConfig: need 0 < hop_ms <= window_ms, got {self.hop_ms} / {self.window_ms}")

    def log_mel(self) -> LogMelConfig:
        return LogMelConfig(sample_rate=self.sample_rate, n_fft=round(self.window_ms * self.sample_rate / 1000),
                            hop_length=round(self.hop_ms * self.sample_rate / 1000), n_mels=self.n_mels,
                            f_min=self.f_min, f_max=min(self.f_max, self.sample_rate / 2), normalize=False)


def _normalize_frames(frames: Tensor, lengths: Tensor) -> Tensor:
    """Zero-mean unit-variance per utterance and dimension over valid frames; padding stays zero."""
    mask = lengths_to_mask(lengths, frames.shape[1]).unsqueeze(-1).to(frames.dtype)  # [B, T, 1]
    count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # [B, 1, 1]
    mean = (frames * mask).sum(dim=1, keepdim=True) / count  # [B, 1, F]
    var = ((frames - mean).square() * mask).sum(dim=1, keepdim=True) / count
    return (frames - mean) * torch.rsqrt(var + 1e-5) * mask


class MilanFrontend(nn.Module):
    """Waveforms, tower outputs or precomputed frames → frames ``[B, T, F]`` + lengths ``[B]``.

    Holds no parameters. The frozen self-supervised tower of kind ``tower`` is not held here: the model keeps
    it as its replaceable ``speech`` tower (so that a feature cache can stand in for it) and passes its output
    to :meth:`forward`.
    """

    def __init__(self, config: FrontendConfig, tower_width: int | None = None):
        super().__init__()
        self.config = config
        self.tower_width = tower_width
        self.log_mel = LogMel(config.log_mel()) if config.kind in ("mfcc", "fbank") else None
        if config.kind == "mfcc":
            self.register_buffer("dct", dct_ii_matrix(config.n_mels, config.n_mfcc), persistent=False)

    @property
    def width(self) -> int:
        """Frame dimension ``F``."""
        cfg = self.config
        if cfg.kind == "mfcc":
            return cfg.n_mfcc
        if cfg.kind == "fbank":
            return cfg.n_mels
        if cfg.kind == "features":
            return cfg.feature_dim
        assert self.tower_width is not None
        return self.tower_width

    @property
    def frame_rate(self) -> float:
        cfg = self.config
        if cfg.kind == "features":
            return cfg.feature_rate
        if cfg.kind == "tower":
            return 50.0  # the 20 ms CNN of wav2vec2 / HuBERT
        return 1000.0 / cfg.hop_ms

    def forward(self, values: Tensor | Any, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``values``: ``[B, T]`` samples (``mfcc``, ``fbank``), ``[B, T, F]`` frames (``features``), or the
        speech tower's output (``tower``: anything with ``hidden_states`` and ``lengths``); ``lengths``: ``[B]``."""
        cfg = self.config
        if cfg.kind == "tower":
            frames, frame_lengths = values.hidden_states[cfg.tower_layer], values.lengths  # [B, T', D]
            frames = frames.detach() * lengths_to_mask(frame_lengths, frames.shape[1]).unsqueeze(-1).to(frames.dtype)
        elif cfg.kind == "features":
            assert lengths is not None
            frames, frame_lengths = values, lengths  # [B, T, F]
            frames = frames * lengths_to_mask(lengths, frames.shape[1]).unsqueeze(-1).to(frames.dtype)
        else:
            assert lengths is not None
            assert self.log_mel is not None
            feats, frame_lengths = self.log_mel(values, lengths)  # [B, M, T'] log-mel, padding zero
            frames = feats.transpose(1, 2)  # [B, T', M]
            if cfg.kind == "mfcc":
                frames = frames @ self.dct  # [B, T', n_mfcc]
        if cfg.normalize:
            frames = _normalize_frames(frames.float(), frame_lengths)
        return frames, frame_lengths  # [B, T', F], [B]
