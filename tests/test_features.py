"""Log-mel front-end: filterbank, spectrum and masking against independent numpy code."""

from __future__ import annotations

import math

import numpy as np
import torch

from vgskit.features import LogMel, LogMelConfig, mel_filterbank


def _np_htk_filterbank(n_freqs: int, sr: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Loop-based HTK triangular filterbank, written independently of the torch version."""

    def mel(f: float) -> float:
        return 2595.0 * math.log10(1.0 + f / 700.0)

    def hz(m: float) -> float:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    m_lo, m_hi = mel(f_min), mel(f_max)
    edges = [hz(m_lo + (m_hi - m_lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = np.zeros((n_freqs, n_mels))
    for k in range(n_freqs):
        f = k * (sr / 2) / (n_freqs - 1)
        for m in range(n_mels):
            lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
            if lo <= f <= c:
                fb[k, m] = (f - lo) / (c - lo)
            elif c < f <= hi:
                fb[k, m] = (hi - f) / (hi - c)
    return fb


def _np_logmel(wav: np.ndarray, cfg: LogMelConfig) -> np.ndarray:
    """Unnormalised log-mel [M, N] with numpy: periodic Hann, frames inside the signal, |rfft|^2."""
    n = (len(wav) - cfg.n_fft) // cfg.hop_length + 1
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)
    frames = np.stack([wav[t * cfg.hop_length : t * cfg.hop_length + cfg.n_fft] * window for t in range(n)])
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2  # [N, F]
    fb = _np_htk_filterbank(cfg.n_fft // 2 + 1, cfg.sample_rate, cfg.n_mels, cfg.f_min, cfg.f_max)
    return np.log(np.maximum(power @ fb, cfg.log_floor)).T


def test_filterbank_matches_numpy() -> None:
    fb = mel_filterbank(201, 16000, 40, 20.0, 8000.0).numpy()
    ref = _np_htk_filterbank(201, 16000, 40, 20.0, 8000.0)
    assert fb.shape == (201, 40)
    np.testing.assert_allclose(fb, ref, atol=1e-6)
    # every filter is non-empty and peaks at most at 1
    assert (fb.max(axis=0) > 0.3).all() and fb.max() <= 1.0 + 1e-6


def test_unnormalised_logmel_matches_numpy() -> None:
    cfg = LogMelConfig(normalize=False)
    rng = np.random.default_rng(0)
    wav = rng.standard_normal(8000).astype(np.float32) * 0.1
    feats, frames = LogMel(cfg)(torch.from_numpy(wav)[None], torch.tensor([8000]))
    ref = _np_logmel(wav.astype(np.float64), cfg)
    assert feats.shape == (1, 40, ref.shape[1]) and int(frames) == ref.shape[1] == (8000 - 400) // 160 + 1
    np.testing.assert_allclose(feats[0].numpy(), ref, atol=2e-3, rtol=1e-4)


def test_sine_energy_lands_in_matching_mel_bin() -> None:
    cfg = LogMelConfig(normalize=False)
    edges = np.linspace(2595 * np.log10(1 + 20 / 700), 2595 * np.log10(1 + 8000 / 700), cfg.n_mels + 2)
    centres = 700 * (10 ** (edges[1:-1] / 2595) - 1)
    t = np.arange(16000) / 16000
    for freq in (300.0, 1000.0, 3000.0, 6000.0):
        wav = torch.tensor(np.sin(2 * np.pi * freq * t), dtype=torch.float32)[None]
        feats, _ = LogMel(cfg)(wav, torch.tensor([16000]))
        peak_bin = int(feats[0].mean(dim=1).argmax())
        assert peak_bin == int(np.abs(centres - freq).argmin()), freq


def test_normalisation_and_padding_are_masked() -> None:
    torch.manual_seed(0)
    lengths = torch.tensor([16000, 9000, 4000])
    wavs = torch.randn(3, 16000) * 0.2
    wavs[1, 9000:] = 5.0  # garbage in the padding must not matter
    frontend = LogMel()
    feats, frames = frontend(wavs, lengths)
    assert frames.tolist() == [(n - 400) // 160 + 1 for n in lengths.tolist()]
    for b in range(3):
        valid = feats[b, :, : frames[b]]
        torch.testing.assert_close(valid.mean(dim=1), torch.zeros(40), atol=1e-4, rtol=0)
        torch.testing.assert_close(valid.std(dim=1, unbiased=False), torch.ones(40), atol=1e-3, rtol=0)
        assert torch.count_nonzero(feats[b, :, frames[b] :]) == 0
    # Alone vs in the batch, in float64: the two passes run FFTs and matrix products of other shapes, whose
    # float32 rounding differs between CPUs (and the log of small mel energies magnifies it); in float64
    # it is ~1e-13, so a visible difference is the padding leaking in.
    frontend64, wavs64 = LogMel().double(), wavs.double()
    feats64, frames64 = frontend64(wavs64, lengths)
    assert frames64.tolist() == frames.tolist()
    for b in range(3):
        alone, n_alone = frontend64(wavs64[b : b + 1, : lengths[b]], lengths[b : b + 1])
        assert int(n_alone) == int(frames[b])
        torch.testing.assert_close(alone[0], feats64[b, :, : frames[b]], atol=1e-9, rtol=0)


def test_filterbank_is_not_saved_in_state_dict() -> None:
    assert LogMel().state_dict() == {}


def test_chunked_front_end_matches_whole_batch(monkeypatch) -> None:
    import vgskit.features as features

    torch.manual_seed(0)
    wavs, lengths = torch.randn(5, 6000), torch.tensor([6000, 5000, 4000, 3000, 2000])
    whole = LogMel()(wavs, lengths)[0]
    monkeypatch.setattr(features, "_CHUNK_SAMPLES", 12000)  # two utterances per chunk: 3 chunks
    torch.testing.assert_close(LogMel()(wavs, lengths)[0], whole, atol=1e-5, rtol=1e-5)


def test_a_batch_shorter_than_one_window_gets_one_frame_as_in_a_zero_padded_batch() -> None:
    torch.manual_seed(0)
    frontend = LogMel(LogMelConfig(normalize=False)).double()
    short = torch.randn(2, 100, dtype=torch.float64) * 0.2  # 100 samples < n_fft = 400
    lengths = torch.tensor([100, 60])
    feats, frames = frontend(short, lengths)
    assert frames.tolist() == [1, 1] and feats.shape == (2, 40, 1)
    # The same utterances in a batch that a longer one zero-pads: the one frame is the same.
    padded = torch.cat([short, torch.zeros(2, 700, dtype=torch.float64)], dim=1)
    feats_padded, _ = frontend(padded, lengths)
    torch.testing.assert_close(feats[:, :, 0], feats_padded[:, :, 0], atol=1e-12, rtol=0)
    # A zero-length waveform is one frame of silence at the log floor, not a crash.
    empty, n = frontend(torch.zeros(1, 0, dtype=torch.float64), torch.tensor([0]))
    assert n.tolist() == [1]
    torch.testing.assert_close(empty, torch.full((1, 40, 1), math.log(frontend.config.log_floor), dtype=torch.float64))
