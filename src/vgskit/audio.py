"""Loading, checking, resampling and saving speech audio.

Every spoken caption enters vgskit through :func:`load_audio`, which returns a 1-D float32 mono waveform at a
fixed sample rate, or raises :class:`~vgskit.errors.AudioError` naming the file and saying what is wrong with
it. Corpora collected in the wild contain empty, silent, corrupt and hour-long files; catching them here, with a
message that points at the file, is far cheaper than a NaN loss three hours into training.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from vgskit.errors import AudioError, ConfigError

__all__ = [
    "DEFAULT_SAMPLE_RATE",
    "SILENCE_PEAK",
    "audio_duration",
    "load_audio",
    "read_wav_bytes_lenient",
    "resample",
    "save_wav",
]

DEFAULT_SAMPLE_RATE = 16000
# Below this peak amplitude a file holds no usable signal (16-bit PCM's smallest step is ~3e-5), so it is
# reported as silent rather than silently normalised into amplified noise.
SILENCE_PEAK = 1e-6


def _check_rate(name: str, value: int) -> int:
    # bool is an int subclass; True as a sample rate is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer (Hz), got {value!r}")
    return int(value)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise AudioError(path, "file not found")
    if not path.is_file():
        raise AudioError(path, "is not a regular file (is it a directory?)")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")


def _unreadable(path: Path, exc: BaseException) -> AudioError:
    # libsndfile's own text ("Format not recognised.", "Unspecified internal error.") is kept because it often
    # says which of several possible problems it is.
    reason = str(exc).strip() or type(exc).__name__
    return AudioError(
        path,
        f"cannot read audio: corrupt, truncated or unsupported format ({reason}); "
        "readable formats are those of libsndfile (wav, flac, ogg/vorbis, opus, mp3, aiff, ...)",
    )


def _probe(path: Path) -> Any:
    """Read only the header of ``path``; raise AudioError for missing or unreadable files."""
    _check_exists(path)
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    if info.samplerate <= 0:
        raise AudioError(path, f"header states an invalid sample rate ({info.samplerate} Hz)")
    return info


def audio_duration(path: str | Path) -> float:
    """Return the duration of ``path`` in seconds, read from the header without decoding any samples.

    Cheap enough to call on every file of a corpus for length filtering and batch bucketing.
    """
    info = _probe(Path(path))
    return float(info.frames) / float(info.samplerate)


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample ``wav`` (``[frames]`` or ``[frames, channels]``) from ``orig_sr`` to ``target_sr`` Hz.

    Uses soxr's 'HQ' quality: its anti-aliasing filter keeps speech bands intact while being fast enough to
    run inside data loaders. Returns float32; the output has ``round(frames * target_sr / orig_sr)`` frames.
    """
    orig_sr = _check_rate("orig_sr", orig_sr)
    target_sr = _check_rate("target_sr", target_sr)
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"resample expects a [frames] or [frames, channels] array, got shape {x.shape}")
    if orig_sr == target_sr or x.shape[0] == 0:
        return np.ascontiguousarray(x)
    out = soxr.resample(np.ascontiguousarray(x), orig_sr, target_sr, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


def load_audio(
    path: str | Path,
    *,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    max_seconds: float | None = 60.0,
    min_seconds: float = 0.05,
) -> np.ndarray:
    """Load ``path`` as a 1-D float32 mono waveform at ``sample_rate`` Hz.

    Any format libsndfile reads is accepted, at any sample rate and channel count; channels are averaged and
    the result is resampled with soxr. Length limits are checked on the header first, so an over-long file
    is rejected without being decoded (a 10-hour recording would otherwise take gigabytes of memory).

    Raises:
        AudioError: the file is missing, unreadable, empty, shorter than ``min_seconds``, longer than
            ``max_seconds``, contains NaN/Inf samples, or is silent. The message names the file.
        ConfigError: ``sample_rate``/``max_seconds``/``min_seconds`` are out of range.
    """
    sample_rate = _check_rate("sample_rate", sample_rate)
    if max_seconds is not None and not max_seconds > 0:
        raise ConfigError(f"max_seconds must be positive or None, got {max_seconds!r}")
    if not min_seconds >= 0:
        raise ConfigError(f"min_seconds must be >= 0, got {min_seconds!r}")
    path = Path(path)

    info = _probe(path)
    if info.frames <= 0:
        raise AudioError(path, "contains no audio samples (0 frames)")
    seconds = float(info.frames) / float(info.samplerate)
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            path,
            f"too long: {seconds:.2f} s exceeds the limit max_seconds={max_seconds:g} s; pass a larger "
            "max_seconds (or max_seconds=None for no limit), or trim/split the recording",
        )
    if seconds < min_seconds:
        raise AudioError(
            path,
            f"too short: {seconds:.4f} s is below min_seconds={min_seconds:g} s (empty or clipped recording)",
        )

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    # A header can promise more frames than the file holds (truncated downloads); judge what was decoded.
    if data.shape[0] == 0:
        raise AudioError(path, "contains no audio samples (0 frames decoded)")
    if data.shape[0] / sr < min_seconds:
        raise AudioError(
            path,
            f"too short: only {data.shape[0] / sr:.4f} s could be decoded, below min_seconds={min_seconds:g} s "
            "(is the file truncated?)",
        )

    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise AudioError(path, f"contains {bad} NaN or infinite sample value(s)")
    peak = float(np.abs(data).max())
    if peak < SILENCE_PEAK:
        raise AudioError(path, f"silent: peak amplitude {peak:.3g} is below {SILENCE_PEAK:g}")

    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if data.shape[1] > 1 and float(np.abs(mono).max()) < SILENCE_PEAK:
        raise AudioError(
            path, "silent after downmixing to mono: the channels cancel out (phase-inverted stereo?)"
        )
    return resample(mono, sr, sample_rate)


def read_wav_bytes_lenient(data: bytes, *, name: str = "<wav bytes>") -> tuple[np.ndarray, int]:
    """Decode 16-bit PCM WAV bytes whose header may state a wrong data size; return ``(mono float32, sr)``.

    Streaming writers such as ``espeak-ng --stdout`` cannot seek back to patch the header, so they write a
    placeholder size (0x7ffff000 for espeak-ng, sometimes 0 or 0xffffffff). libsndfile rejects or truncates
    such streams. Here the 'data' chunk's stated size is honoured only when it is plausible (non-zero and
    within the bytes actually present); otherwise every byte after the chunk header is taken as samples.
    Channels are averaged to mono; samples are scaled to [-1, 1). ``name`` labels the bytes in errors.
    """
    buf = memoryview(bytes(data))
    if len(buf) < 12 or bytes(buf[0:4]) != b"RIFF" or bytes(buf[8:12]) != b"WAVE":
        raise AudioError(name, "not a RIFF/WAVE stream (missing 'RIFF....WAVE' header)")

    fmt: tuple[int, int, int, int] | None = None  # (format tag, channels, sample rate, bits per sample)
    pos = 12
    while pos + 8 <= len(buf):
        chunk_id = bytes(buf[pos : pos + 4])
        (size,) = struct.unpack("<I", buf[pos + 4 : pos + 8])
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(buf):
                raise AudioError(name, f"'fmt ' chunk is too short ({size} bytes)")
            tag, channels, rate, _byte_rate, _align, bits = struct.unpack("<HHIIHH", buf[body : body + 16])
            if tag == 0xFFFE and size >= 40 and body + 40 <= len(buf):
                # WAVE_FORMAT_EXTENSIBLE: the real format tag is the first two bytes of the SubFormat GUID.
                (tag,) = struct.unpack("<H", buf[body + 24 : body + 26])
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise AudioError(name, "'data' chunk comes before the 'fmt ' chunk")
            tag, channels, rate, bits = fmt
            if tag != 1 or bits != 16:
                raise AudioError(
                    name, f"only 16-bit PCM is supported (format tag {tag}, {bits} bits per sample)"
                )
            if channels < 1 or rate < 1:
                raise AudioError(name, f"invalid header: {channels} channel(s) at {rate} Hz")
            available = len(buf) - body
            n_bytes = size if 0 < size <= available else available
            frame_bytes = 2 * channels
            n_frames = n_bytes // frame_bytes  # a trailing partial frame is a cut-off write; drop it
            pcm = np.frombuffer(buf[body : body + n_frames * frame_bytes], dtype="<i2").reshape(
                n_frames, channels
            )
            wav = pcm.astype(np.float32) / 32768.0
            mono = wav.mean(axis=1, dtype=np.float32) if channels > 1 else wav[:, 0]
            return np.ascontiguousarray(mono), int(rate)
        # RIFF chunks are padded to an even length.
        pos = body + size + (size & 1)
    raise AudioError(name, "no 'data' chunk found")


def save_wav(path: str | Path, wav: np.ndarray, sample_rate: int) -> Path:
    """Write ``wav`` (``[frames]`` or ``[frames, channels]``, float in [-1, 1]) as 16-bit PCM WAV atomically.

    The data goes to a temporary file in the same folder that is then renamed over ``path``, so readers never
    see a half-written file even if the process is killed. Values outside [-1, 1] are clipped, because
    integer conversion would otherwise wrap them around into loud clicks.
    """
    sample_rate = _check_rate("sample_rate", sample_rate)
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"save_wav expects a [frames] or [frames, channels] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"refusing to write {path}: waveform contains NaN or infinite values")
    x = np.clip(x, -1.0, 1.0)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name lets several writers target the same folder concurrently.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, x, sample_rate, format="WAV", subtype="PCM_16")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
