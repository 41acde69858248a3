"""Tests for vgskit.audio: loading, resampling, validation errors, lenient WAV parsing and atomic saving."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vgskit import audio
from vgskit.audio import audio_duration, load_audio, read_wav_bytes_lenient, resample, save_wav
from vgskit.errors import AudioError, ConfigError


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wav: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / sr)[np.argmax(spectrum)])


def _pcm16_wav(frames: np.ndarray, sr: int, *, data_size: int | None, trailer: bytes = b"") -> bytes:
    """A 16-bit PCM WAV whose 'data' size field is ``data_size`` (None: the true size)."""
    frames = np.asarray(frames, dtype="<i2")
    channels = 1 if frames.ndim == 1 else frames.shape[1]
    payload = frames.tobytes()
    size = len(payload) if data_size is None else data_size
    fmt = struct.pack("<HHIIHH", 1, channels, sr, sr * 2 * channels, 2 * channels, 16)
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", size)
        + payload
        + trailer
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --- loading and resampling --------------------------------------------------------------------------------------


def test_stereo_44k_sine_becomes_16k_mono_with_peak_at_440(tmp_path: Path) -> None:
    sr_in = 44100
    left, right = _sine(440, sr_in, 1.0, amp=0.6), _sine(440, sr_in, 1.0, amp=0.2)
    path = tmp_path / "tone.wav"
    sf.write(path, np.stack([left, right], axis=1), sr_in, subtype="FLOAT")

    wav = load_audio(path, sample_rate=16000)

    assert wav.dtype == np.float32 and wav.ndim == 1
    assert len(wav) == 16000  # 44100 frames * 16000 / 44100
    assert _peak_hz(wav, 16000) == pytest.approx(440, abs=1.0)
    # Downmix is the mean of the channels: (0.6 + 0.2) / 2, away from the filter's edge transients.
    assert np.abs(wav[1000:-1000]).max() == pytest.approx(0.4, abs=0.01)


@pytest.mark.parametrize(("fmt", "ext"), [("FLAC", "flac"), ("OGG", "ogg")])
def test_compressed_formats_load_at_target_rate(tmp_path: Path, fmt: str, ext: str) -> None:
    path = tmp_path / f"tone.{ext}"
    sf.write(path, _sine(300, 22050, 0.5), 22050, format=fmt)
    wav = load_audio(path, sample_rate=8000)
    assert abs(len(wav) - 4000) <= 2  # lossy codecs may pad a few samples
    assert _peak_hz(wav, 8000) == pytest.approx(300, abs=3.0)


def test_resample_length_dtype_and_identity() -> None:
    x = _sine(1000, 48000, 0.25)
    y = resample(x, 48000, 16000)
    assert y.dtype == np.float32 and y.shape == (4000,)
    assert _peak_hz(y, 16000) == pytest.approx(1000, abs=4.0)
    # A frequency above the new Nyquist limit must be filtered out, not aliased into the band.
    aliased = resample(_sine(10000, 48000, 0.25), 48000, 16000)
    assert np.abs(aliased[200:-200]).max() < 0.01
    np.testing.assert_array_equal(resample(x, 48000, 48000), x)
    stereo = resample(np.stack([x, x], axis=1), 48000, 16000)
    assert stereo.shape == (4000, 2)
    with pytest.raises(ConfigError, match="orig_sr"):
        resample(x, 0, 16000)


def test_audio_duration_reads_header_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.flac"
    sf.write(path, _sine(200, 8000, 1.25), 8000, format="FLAC")
    monkeypatch.setattr(audio.sf, "read", lambda *a, **k: pytest.fail("audio_duration decoded samples"))
    assert audio_duration(path) == pytest.approx(1.25)


# --- errors ------------------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"nope\.wav: file not found") as info:
        load_audio(tmp_path / "nope.wav")
    assert info.value.path == str(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="not found"):
        audio_duration(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(tmp_path)


def test_zero_byte_and_corrupt_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: file is empty \(0 bytes\)"):
        load_audio(empty)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 50)
    with pytest.raises(AudioError, match=r"junk\.wav: cannot read audio: corrupt"):
        load_audio(junk)
    with pytest.raises(AudioError, match="cannot read audio"):
        audio_duration(junk)


def test_zero_frames_and_too_short(tmp_path: Path) -> None:
    none = tmp_path / "none.wav"
    sf.write(none, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"none\.wav: contains no audio samples"):
        load_audio(none)
    short = tmp_path / "short.wav"
    sf.write(short, _sine(440, 16000, 0.01), 16000)
    with pytest.raises(AudioError, match=r"short\.wav: too short: 0\.0100 s is below min_seconds=0\.05"):
        load_audio(short)
    assert len(load_audio(short, min_seconds=0.005)) == 160


def test_too_long_is_rejected_from_header_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, _sine(220, 8000, 61.0), 8000, subtype="PCM_16")

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("an over-long file was decoded")

    monkeypatch.setattr(audio.sf, "read", no_decoding)
    with pytest.raises(
        AudioError, match=r"long\.wav: too long: 61\.00 s exceeds the limit max_seconds=60"
    ) as info:
        load_audio(path)
    assert "max_seconds=None" in info.value.problem  # says how to lift the limit
    monkeypatch.undo()
    assert len(load_audio(path, max_seconds=None, sample_rate=8000)) == 61 * 8000


def test_nan_and_inf_samples(tmp_path: Path) -> None:
    x = _sine(440, 16000, 0.5)
    x[100], x[200] = np.nan, np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: contains 2 NaN or infinite sample value"):
        load_audio(path)


def test_silent_and_cancelling_stereo(tmp_path: Path) -> None:
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(8000, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"silent\.wav: silent: peak amplitude"):
        load_audio(silent)
    x = _sine(440, 16000, 0.5)
    inverted = tmp_path / "inverted.wav"
    sf.write(inverted, np.stack([x, -x], axis=1), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"inverted\.wav: silent after downmixing"):
        load_audio(inverted)


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sample_rate"):
        load_audio(tmp_path / "x.wav", sample_rate=0)
    with pytest.raises(ConfigError, match="max_seconds"):
        load_audio(tmp_path / "x.wav", max_seconds=-1)


# --- lenient WAV bytes -------------------------------------------------------------------------------------------


def test_lenient_reader_on_real_espeak_output(tmp_path: Path) -> None:
    data = subprocess.run(
        ["espeak-ng", "--stdout", "hello"], capture_output=True, check=True, timeout=30
    ).stdout
    (stated,) = struct.unpack("<I", data[40:44])
    assert data[36:40] == b"data" and stated > len(data)  # the header really is bogus

    wav, sr = read_wav_bytes_lenient(data)

    assert sr == 22050
    assert wav.dtype == np.float32 and len(wav) == (len(data) - 44) // 2
    # Ground truth: the same bytes as a file, which libsndfile clamps to the real size.
    path = tmp_path / "hello.wav"
    path.write_bytes(data)
    reference, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(wav, reference, atol=1e-7)
    assert np.abs(wav).max() > 0.05  # actual speech, not silence


@pytest.mark.parametrize("stated", [0, 0xFFFFFFFF, 0x7FFFF000])
def test_lenient_reader_ignores_placeholder_sizes(stated: int) -> None:
    pcm = (np.arange(1001) * 7 - 3000).astype(np.int16)
    wav, sr = read_wav_bytes_lenient(_pcm16_wav(pcm, 11025, data_size=stated))
    assert sr == 11025
    np.testing.assert_array_equal(wav, pcm.astype(np.float32) / 32768)


def test_lenient_reader_honours_a_true_size_before_trailing_chunks() -> None:
    pcm = np.array([[1000, -1000], [3000, 1000], [-500, -1500]], dtype=np.int16)
    trailer = b"LIST" + struct.pack("<I", 4) + b"INFO"
    wav, sr = read_wav_bytes_lenient(_pcm16_wav(pcm, 8000, data_size=None, trailer=trailer))
    assert sr == 8000
    np.testing.assert_allclose(wav, np.array([0, 2000, -1000]) / 32768)  # stereo mean, trailer excluded


def test_lenient_reader_errors_name_the_source() -> None:
    with pytest.raises(AudioError, match=r"tts output: not a RIFF/WAVE stream"):
        read_wav_bytes_lenient(b"hello world, definitely not a wav", name="tts output")
    good = _pcm16_wav(np.zeros(4, dtype=np.int16), 8000, data_size=None)
    eight_bit = good[:34] + struct.pack("<H", 8) + good[36:]  # bits-per-sample field
    with pytest.raises(AudioError, match="only 16-bit PCM"):
        read_wav_bytes_lenient(eight_bit)
    with pytest.raises(AudioError, match="no 'data' chunk"):
        read_wav_bytes_lenient(good[:36])


# --- saving ------------------------------------------------------------------------------------------------------


def test_save_wav_round_trip_clips_and_leaves_no_temp_files(tmp_path: Path) -> None:
    x = _sine(440, 16000, 0.5, amp=0.8)
    x[10], x[11] = 1.5, -2.0
    path = save_wav(tmp_path / "sub" / "out.wav", x, 16000)

    info = sf.info(path)
    assert (info.samplerate, info.subtype, info.frames) == (16000, "PCM_16", len(x))
    back = load_audio(path)
    expected = np.clip(x, -1, 1)
    np.testing.assert_allclose(back, expected, atol=1.5 / 32768)  # clipped, never wrapped around
    assert [p.name for p in path.parent.iterdir()] == ["out.wav"]


def test_save_wav_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_wav(tmp_path / "out.wav", _sine(440, 16000, 0.2), 16000)
    before = path.read_bytes()

    def broken_write(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(audio.sf, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_wav(path, _sine(880, 16000, 0.2), 16000)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]
    with pytest.raises(ValueError, match="NaN"):
        save_wav(tmp_path / "nan.wav", np.array([0.0, np.nan]), 16000)
