"""Log-mel filterbank features in pure torch.

The mel scale is the **HTK** formula ``mel(f) = 2595 · log10(1 + f / 700)`` and the filters are triangles
in Hz between adjacent mel-spaced centres, evaluated at the FFT bin frequencies, without area
normalisation (peak 1.0) — the same convention as ``torchaudio``'s ``melscale_fbanks(mel_scale="htk",
norm=None)`` and Kaldi-style filterbanks.

Framing is ``torch.stft(center=False)``: frame ``t`` covers samples ``[t·hop, t·hop + n_fft)``, so an
utterance of ``L`` samples has ``(L - n_fft) // hop + 1`` frames that lie entirely inside it. Only those
count as valid; features past them are zeroed and utterance statistics use valid frames only. Valid
frames never read a padded sample, which makes features *padding-invariant* (an utterance gives the same
features alone or padded in a batch, whatever the padding holds) at no cost — no reflect padding, no
waveform masking. Utterances shorter than ``n_fft`` samples (25 ms) get one frame, partly padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vgskit.errors import ConfigError
from vgskit.layers import lengths_to_mask

_CHUNK_SAMPLES = 1 << 20


@dataclass
class LogMelConfig:
    """Parameters of :class:`LogMel` (defaults: 25 ms Hann window, 10 ms hop, 40 bins, 16 kHz)."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40
    f_min: float = 20.0
    f_max: float = 8000.0
    log_floor: float = 1e-6
    normalize: bool = True  # per-utterance mean/variance normalisation of each bin over valid frames


def hz_to_mel(freq: Tensor | float) -> Tensor:
    """HTK mel scale."""
    freq = torch.as_tensor(freq, dtype=torch.float64)
    return 2595.0 * torch.log10(1.0 + freq / 700.0)


def mel_to_hz(mel: Tensor | float) -> Tensor:
    """Inverse of :func:`hz_to_mel`."""
    mel = torch.as_tensor(mel, dtype=torch.float64)
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int, sample_rate: int, n_mels: int, f_min: float, f_max: float
) -> Tensor:
    """Triangular HTK mel filterbank ``[n_freqs, n_mels]`` (float32) for a one-sided spectrum of ``n_freqs`` bins.

    Filter ``m`` rises linearly from centre ``m-1`` to centre ``m`` and falls to centre ``m+1``, where the
    ``n_mels + 2`` edge frequencies are equally spaced on the mel scale between ``f_min`` and ``f_max``.
    """
    bin_hz = torch.linspace(0.0, sample_rate / 2.0, n_freqs, dtype=torch.float64)  # [F]
    edges_mel = torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64)
    edges_hz = mel_to_hz(edges_mel)  # [M + 2]
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]  # [M] each
    f = bin_hz.unsqueeze(1)  # [F, 1]
    rising = (f - lower) / (centre - lower)
    falling = (upper - f) / (upper - centre)
    return torch.minimum(rising, falling).clamp(min=0.0).to(torch.float32)  # [F, M]


class LogMel(nn.Module):
    """Waveforms ``[B, T]`` + lengths ``[B]`` → log-mel features ``[B, n_mels, T // hop]`` + frame lengths ``[B]``.

    Holds no parameters; the window and filterbank are non-persistent buffers (rebuilt from the config, never
    written into checkpoints).
    """

    def __init__(self, config: LogMelConfig | None = None):
        super().__init__()
        self.config = config = config or LogMelConfig()
        if config.n_fft < config.hop_length:
            raise ConfigError(f"LogMelConfig: n_fft ({config.n_fft}) must be >= hop_length ({config.hop_length})")
        if not 0 <= config.f_min < config.f_max <= config.sample_rate / 2:
            raise ConfigError(
                f"LogMelConfig: need 0 <= f_min < f_max <= sample_rate/2, got f_min={config.f_min}, "
                f"f_max={config.f_max}, sample_rate={config.sample_rate}"
            )
        n_freqs = config.n_fft // 2 + 1
        self.register_buffer("window", torch.hann_window(config.n_fft, periodic=True), persistent=False)
        self.register_buffer(
            "filterbank",
            mel_filterbank(n_freqs, config.sample_rate, config.n_mels, config.f_min, config.f_max),
            persistent=False,
        )
        self.register_buffer(
            "filterbank_ri", self.filterbank.repeat_interleave(2, dim=0), persistent=False
        )  # [2F, M]

    @property
    def frame_rate(self) -> float:
        """Frames per second."""
        return self.config.sample_rate / self.config.hop_length

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Frames lying entirely within ``lengths`` samples (at least one, so statistics never divide by zero)."""
        cfg = self.config
        return (torch.div(lengths - cfg.n_fft, cfg.hop_length, rounding_mode="floor") + 1).clamp(min=1)

    def mel_power(self, wavs: Tensor) -> Tensor:
        """Mel-filtered power spectrum ``[B, n_mels, N]`` (before the log), ``N = (T - n_fft) // hop + 1``."""
        cfg = self.config
        batch, total = wavs.shape
        n_frames = (total - cfg.n_fft) // cfg.hop_length + 1
        out = wavs.new_empty(batch, n_frames, cfg.n_mels)  # [B, N, M]
        # A few utterances at a time: the framed signal is 2.5x the waveform, and one buffer for a whole
        # batch (~100 MB) is a fresh allocation on every call whose page faults cost more than the FFT.
        # Chunks of ~1M samples are recycled by the allocator instead; about 3x faster on a 2-core CPU.
        rows = max(1, _CHUNK_SAMPLES // max(total, 1))
        for start in range(0, batch, rows):
            spec = torch.stft(
                wavs[start : start + rows], cfg.n_fft, cfg.hop_length, window=self.window, center=False,
                return_complex=True,
            )  # [b, F, N] with F = n_fft/2 + 1, laid out in memory as [b, N, F]
            # Stay in the [b, N, F] memory layout (elementwise ops over the transposed view are several times
            # slower) and fold |X|^2 = re^2 + im^2 into the matmul with a filterbank whose rows are duplicated
            # for the interleaved (re, im) pairs, which saves a pass over the largest tensor here.
            ri = torch.view_as_real(spec.transpose(1, 2)).flatten(2)  # [b, N, 2F]: re0, im0, re1, im1, ...
            torch.matmul(ri.square_(), self.filterbank_ri, out=out[start : start + rows])  # [b, N, M]
        return out.transpose(1, 2)  # [B, M, N]

    def forward(self, wavs: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        # wavs: [B, T] float; lengths: [B] samples
        cfg = self.config
        # No autograd (no parameters here) and no autocast: in bf16 the power spectrum and the one-pass
        # variance below would lose most of their precision.
        with torch.no_grad(), torch.autocast(wavs.device.type, enabled=False):
            if wavs.shape[-1] < cfg.n_fft:
                # A batch shorter than one window: zero-pad it to one frame, as a longer batch's padding would.
                wavs = torch.nn.functional.pad(wavs, (0, cfg.n_fft - wavs.shape[-1]))
            # computed in the dtype of the buffers (float32 unless the module was cast, e.g. .double())
            feats = self.mel_power(wavs.to(self.window.dtype)).clamp_(min=cfg.log_floor).log_()  # [B, M, N]
            frames = self.frame_lengths(lengths)  # [B]
            mask = lengths_to_mask(frames, feats.shape[-1]).unsqueeze(1).to(feats.dtype)  # [B, 1, N]
            if cfg.normalize:
                # One pass for both moments (var = E[x^2] - E[x]^2) and one fused affine: these [B, M, N]
                # passes are a noticeable share of a CPU training step. Log-mel values are O(10), so the
                # single-pass variance is accurate in float32.
                count = mask.sum(dim=-1, keepdim=True).clamp(min=1.0)  # [B, 1, 1]
                masked = feats * mask
                mean = masked.sum(dim=-1, keepdim=True) / count  # [B, M, 1]
                var = (masked * feats).sum(dim=-1, keepdim=True) / count - mean.square()
                inv_std = torch.rsqrt(var.clamp(min=0.0) + 1e-5)
                feats = torch.addcmul(-mean * inv_std, feats, inv_std)
            feats = feats * mask  # padded frames are exactly zero
        return feats, frames


def num_frames(num_samples: int, n_fft: int = 400, hop_length: int = 160) -> int:
    """Number of frames :class:`LogMel` produces for ``num_samples`` samples (``num_samples >= n_fft``)."""
    return max(1, (num_samples - n_fft) // hop_length + 1)
