"""Loading, checking, resampling and saving speech audio.

Every spoken caption enters vgskit through :func:`load_audio`, which returns a 1-D float32 mono waveform at a
fixed sample rate, or raises :class:`~vgskit.errors.AudioError` naming the file and saying what is wrong with
it. Corpora collected in the wild contain empty, silent, corrupt and hour-long files; catching them here, with a
message that points at the file, is far cheaper than a NaN loss three hours into training.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from vgskit.errors import AudioError, ConfigError

__all__ = [
    "DEFAULT_SAMPLE_RATE",
    "MAX_ABS_AMPLITUDE",
    "MAX_AUDIO_SECONDS",
    "MIN_AUDIO_SECONDS",
    "SILENCE_PEAK",
    "audio_duration",
    "load_audio",
    "read_wav_bytes_lenient",
    "resample",
    "save_wav",
    "validate_audio_file",
    "validate_waveform",
]

DEFAULT_SAMPLE_RATE = 16000
#: Training, caching and ``vgskit data check`` refuse spoken captions longer than this (seconds) unless told
#: otherwise: one limit, defined once, so that a check never passes a file that training then refuses.
MAX_AUDIO_SECONDS = 60.0
#: ... and shorter than this: 50 ms holds no word; such files are clipped or empty recordings.
MIN_AUDIO_SECONDS = 0.05
# Below this peak amplitude a file holds no usable signal (16-bit PCM's smallest step is ~3e-5), so it is
# reported as silent rather than silently normalised into amplified noise.
SILENCE_PEAK = 1e-6
#: Float audio is expected in [-1, 1]. A peak above this (24 dB over full scale) is not a loud recording but
#: unscaled samples: int16 PCM stored as floats peaks at 16 or more unless the recording itself is below
#: -66 dBFS, i.e. practically silent. Such input is refused instead of being fed to a model in the wrong units.
MAX_ABS_AMPLITUDE = 16.0
# When the mono mix of a multi-channel file is this much weaker (in energy) than its loudest channel, the
# channels cancel out (one is phase-inverted): -60 dB is far beyond any real recording's stereo difference.
_CANCEL_RATIO = 1e-6
# libsndfile reports SF_COUNT_MAX frames when a header does not state the length (e.g. a FLAC whose
# STREAMINFO total-sample count is 0, as written by encoders reading from a pipe). No real file comes close.
_UNKNOWN_FRAMES = 2**62
# A WAV 'data' size at or above this is a streaming writer's placeholder (espeak-ng writes 0x7ffff000, others
# 0xffffffff), never a real size: a file this large would be refused as too long anyway.
_PLACEHOLDER_SIZE = 0x7FFF0000
# Frames decoded per call when the length is not known in advance.
_CHUNK_FRAMES = 1 << 16
# Formats whose header frame count is exact, so that fewer decoded frames mean a damaged file. Lossy formats
# (Ogg, MP3) may state an estimate.
_ESTIMATED_LENGTH_FORMATS = frozenset({"OGG", "MP3", "MPEG"})
# WAV format tag and bits per sample -> libsndfile RAW subtype, for reading WAVs whose 'data' size is 0.
_RAW_SUBTYPES = {
    (1, 8): "PCM_U8", (1, 16): "PCM_16", (1, 24): "PCM_24", (1, 32): "PCM_32",
    (3, 32): "FLOAT", (3, 64): "DOUBLE", (6, 8): "ALAW", (7, 8): "ULAW",
}
# Integer PCM dtypes and how they map to [-1, 1): (offset subtracted, divisor).
_INT_SCALES: dict[np.dtype[Any], tuple[float, float]] = {
    np.dtype(np.int8): (0.0, 2.0**7),
    np.dtype(np.int16): (0.0, 2.0**15),
    np.dtype(np.int32): (0.0, 2.0**31),
    np.dtype(np.uint8): (2.0**7, 2.0**7),
    np.dtype(np.uint16): (2.0**15, 2.0**15),
}


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


def _seconds(frames: int, rate: int) -> str:
    return f"{frames} frames ({frames / rate:.3f} s)"


def validate_waveform(wav: np.ndarray, sample_rate: int, *, source: str) -> np.ndarray:
    """Check a waveform handed over in memory and return it as 1-D float32 mono; raise AudioError otherwise.

    The same checks :func:`load_audio` applies to files, for audio that never was a file (an API caller's
    array), so that both paths refuse the same bad input instead of embedding it into NaN scores:

    * integer PCM is converted to float32 in [-1, 1): int16 / 32768, int32 / 2**31, int8 / 128, and the
      unsigned uint8 / uint16 centred first ((x - 128) / 128, (x - 32768) / 32768); float16/32/64 are cast to
      float32. Other dtypes (bool, int64, complex, object) are refused: their scale is ambiguous.
    * the array must be 1-D mono and non-empty; multi-channel arrays are refused with how to down-mix them.
    * NaN/Inf are refused; so is a peak amplitude above :data:`MAX_ABS_AMPLITUDE` (float audio belongs in
      about [-1, 1]; larger values are unscaled integer samples or garbage).
    * silent audio (peak below :data:`SILENCE_PEAK`) and constant audio (a DC offset with no signal: the
      peak-to-peak range, which ignores any DC offset, below :data:`SILENCE_PEAK`) are refused.

    Duration limits are not applied here (they depend on the caller); the samples are not rescaled or
    DC-corrected, so valid input comes back unchanged except for the dtype. A 1-D float32 array may be
    returned as is, without a copy. ``sample_rate`` (Hz) must be a positive integer; ``source`` names the
    waveform in every error (:attr:`AudioError.path`).
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioError(source, f"sample rate must be a positive integer (Hz), got {sample_rate!r}")
    try:
        x = np.asarray(wav)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise AudioError(source, f"not an array of audio samples ({exc})") from exc
    kind = x.dtype.kind
    native = x.dtype.newbyteorder("=") if kind in "iu" else x.dtype  # big-endian PCM scales the same
    if kind not in "iuf" or (kind in "iu" and native not in _INT_SCALES):
        raise AudioError(
            source,
            f"unsupported sample type {x.dtype}: pass float32 in [-1, 1] or int16/int32 PCM "
            "(int8/uint8/uint16 are also converted)",
        )
    if x.ndim != 1:
        if x.ndim == 0:
            raise AudioError(source, "a single number, not a waveform: pass a 1-D array of samples")
        if x.ndim == 2 and 1 in x.shape:
            hint = "it holds one channel: pass wav.reshape(-1)"
        elif x.ndim == 2:
            axis = int(np.argmin(x.shape))
            hint = f"down-mix it to mono first, e.g. wav.mean(axis={axis}) if axis {axis} holds the channels"
        else:
            hint = "pass a 1-D mono array of samples"
        raise AudioError(source, f"expected a 1-D mono waveform, got an array of shape {x.shape}; {hint}")
    if x.size == 0:
        raise AudioError(source, "empty waveform (0 samples)")
    if kind == "f":
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(x.size - np.count_nonzero(finite))
            raise AudioError(source, f"contains {bad} NaN or infinite sample value(s)")
        peak = float(np.abs(x).max())
        if peak > MAX_ABS_AMPLITUDE:
            raise AudioError(
                source,
                f"peak amplitude {peak:.3g} is far outside [-1, 1] (limit {MAX_ABS_AMPLITUDE:g}): float audio must "
                "be scaled to [-1, 1]; integer PCM stored as floats must be divided by 32768 (16-bit) or 2**31 "
                "(32-bit), or passed with its integer dtype",
            )
        out = np.ascontiguousarray(x, dtype=np.float32)
    else:
        offset, scale = _INT_SCALES[native]
        out = ((x.astype(np.float64) - offset) / scale).astype(np.float32)
    peak = float(np.abs(out).max())
    if peak < SILENCE_PEAK:
        raise AudioError(source, f"silent: peak amplitude {peak:.3g} is below {SILENCE_PEAK:g}")
    spread = float(out.max()) - float(out.min())
    if spread < SILENCE_PEAK:
        raise AudioError(
            source,
            f"constant: every sample is {float(out[0]):.6g} (a DC offset, no signal; peak-to-peak {spread:.3g} "
            f"is below {SILENCE_PEAK:g})",
        )
    return out


@dataclass(frozen=True)
class _WavLayout:
    """Where a RIFF/WAVE file's samples are and what its 'data' chunk header claims about them."""

    offset: int  # first byte of the samples
    stated: int  # the 'data' chunk's size field
    available: int  # bytes from ``offset`` to the end of the file
    tag: int
    channels: int
    rate: int
    bits: int

    @property
    def frame_bytes(self) -> int:
        return self.channels * ((self.bits + 7) // 8)


def _wav_layout(path: Path) -> _WavLayout | None:
    """Read the chunk headers of a RIFF/WAVE file up to its 'data' chunk; ``None`` for any other file, or a
    layout this cannot follow (libsndfile then judges the file alone)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            fmt: tuple[int, int, int, int] | None = None
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                chunk_id, (n,) = chunk[:4], struct.unpack("<I", chunk[4:])
                body = pos + 8
                if chunk_id == b"fmt ":
                    raw = f.read(min(n, 40))
                    if len(raw) < 16:
                        return None
                    tag, channels, rate, _byte_rate, _align, bits = struct.unpack("<HHIIHH", raw[:16])
                    if tag == 0xFFFE and len(raw) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the tag opens the SubFormat GUID
                        (tag,) = struct.unpack("<H", raw[24:26])
                    fmt = (tag, channels, rate, bits)
                elif chunk_id == b"data":
                    if fmt is None or fmt[1] < 1 or fmt[2] < 1 or fmt[3] < 1:
                        return None
                    return _WavLayout(body, n, size - body, *fmt)
                pos = body + n + (n & 1)  # chunks are padded to an even length
    except OSError as exc:
        raise AudioError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    return None


@dataclass(frozen=True)
class _Header:
    """What the header of an audio file says, corrected where headers are known to lie."""

    frames: int | None  # None: the header states no length; only decoding tells
    samplerate: int
    channels: int
    exact: bool  # the frame count is exact, so fewer decoded frames mean a damaged file
    raw: tuple[int, int, str] | None = None  # WAV with a 0 'data' size: (offset, bytes, RAW subtype) to read


def _probe(path: Path) -> _Header:
    """Read only the header of ``path``; raise AudioError for missing, unreadable or truncated files.

    WAV headers are checked against the file size, because libsndfile silently clamps a stated length that
    runs past the end of the file: a truncated download would be used as if it were complete. A 'data' size of
    0 (left by streaming writers that cannot seek back) is not taken at its word: the samples present are used.
    """
    _check_exists(path)
    wav = _wav_layout(path)
    if wav is not None and wav.frame_bytes > 0:
        if wav.stated == 0 and wav.available >= wav.frame_bytes:
            subtype = _RAW_SUBTYPES.get((wav.tag, wav.bits))
            if subtype is None:
                raise AudioError(
                    path,
                    f"the WAV 'data' size is 0 (as left by streaming writers) and its format (tag {wav.tag}, "
                    f"{wav.bits} bits) cannot be read without it; re-encode the file",
                )
            frames = wav.available // wav.frame_bytes
            return _Header(frames, wav.rate, wav.channels, True, (wav.offset, frames * wav.frame_bytes, subtype))
        missing = wav.stated - wav.available
        if wav.stated < _PLACEHOLDER_SIZE and missing >= wav.frame_bytes:
            total, present = wav.stated // wav.frame_bytes, wav.available // wav.frame_bytes
            raise AudioError(
                path,
                f"truncated: the WAV header states {_seconds(total, wav.rate)} of audio but the file holds only "
                f"{_seconds(present, wav.rate)}; {_seconds(total - present, wav.rate)} "
                f"({100 * (total - present) / total:.0f}%) are missing. Re-download or re-export the file",
            )
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    if info.samplerate <= 0:
        raise AudioError(path, f"header states an invalid sample rate ({info.samplerate} Hz)")
    if info.channels <= 0:
        raise AudioError(path, f"header states an invalid channel count ({info.channels})")
    frames = None if info.frames >= _UNKNOWN_FRAMES else int(info.frames)
    exact = frames is not None and info.format not in _ESTIMATED_LENGTH_FORMATS
    return _Header(frames, int(info.samplerate), int(info.channels), exact)


def _read_unknown_length(path: Path, header: _Header, limit: int | None, *, keep: bool) -> tuple[np.ndarray, int]:
    """Decode a file whose header states no length: at most ``limit`` frames (None: all); return the samples
    (``[frames, channels]``; empty unless ``keep``) and the number of frames decoded.

    soundfile's ``read`` cannot be used here: after each block it seeks to the position it computed, and
    libsndfile cannot seek to the end of such a stream, so the last block fails. libsndfile's own read call
    does not seek, and memory stays bounded by ``limit`` (or by one block when only counting).
    """
    lib, ffi = getattr(sf, "_snd", None), getattr(sf, "_ffi", None)
    if lib is None or ffi is None:  # pragma: no cover - every soundfile release so far has both
        raise AudioError(path, "the header states no length and this soundfile version cannot decode such a "
                               "stream; re-encode the file to a seekable file")
    blocks: list[np.ndarray] = []
    total = 0
    try:
        with sf.SoundFile(str(path)) as f:
            buf = np.empty((_CHUNK_FRAMES, header.channels), dtype=np.float32)
            while limit is None or total < limit:
                want = _CHUNK_FRAMES if limit is None else min(_CHUNK_FRAMES, limit - total)
                got = int(lib.sf_readf_float(f._file, ffi.cast("float *", buf.ctypes.data), want))
                if got <= 0:
                    break
                if keep:
                    blocks.append(buf[:got].copy())
                total += got
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    data = np.concatenate(blocks) if blocks else np.zeros((0, header.channels), dtype=np.float32)
    return data, total


def _read_raw(path: Path, header: _Header) -> tuple[np.ndarray, int]:
    """Decode the samples of a WAV whose 'data' size is 0, as located by :func:`_probe`."""
    assert header.raw is not None
    offset, n_bytes, subtype = header.raw
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            payload = f.read(n_bytes)
        data, _ = sf.read(io.BytesIO(payload), format="RAW", subtype=subtype, channels=header.channels,
                          samplerate=header.samplerate, endian="LITTLE", dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    return data, header.samplerate


def audio_duration(path: str | Path) -> float:
    """Return the duration of ``path`` in seconds, read from the header without decoding any samples.

    Cheap enough to call on every file of a corpus for length filtering and batch bucketing. Where the header
    does not state the length (a FLAC written to a pipe), the file is decoded block by block to count its
    frames rather than reporting libsndfile's placeholder (which reads as 5.8e14 s); memory stays bounded.
    A truncated WAV raises :class:`~vgskit.errors.AudioError` here already.
    """
    path = Path(path)
    header = _probe(path)
    frames = header.frames
    if frames is None:
        _, frames = _read_unknown_length(path, header, None, keep=False)
    return float(frames) / float(header.samplerate)


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


def _too_long(path: Path, seconds: str, max_seconds: float) -> AudioError:
    return AudioError(
        path,
        f"too long: {seconds} s exceeds the limit max_seconds={max_seconds:g} s; pass a larger "
        "max_seconds (or max_seconds=None for no limit), or trim/split the recording",
    )


def _downmix(data: np.ndarray, path: Path) -> np.ndarray:
    """Average ``[frames, channels]`` to mono, refusing channels that cancel each other out.

    A peak check on the mix misses cancellation that leaves a DC offset or a little noise behind, so the
    energy of the mix (around its mean) is compared with that of the loudest channel instead.
    """
    if data.shape[1] == 1:
        return data[:, 0]
    mono = data.mean(axis=1, dtype=np.float32)
    if np.isfinite(data).all():
        loudest = float(data.var(axis=0).max())
        mixed = float(mono.var())
        if loudest > SILENCE_PEAK**2 and mixed < loudest * _CANCEL_RATIO:
            level = ("exactly constant" if mixed == 0
                     else f"{10 * np.log10(loudest / mixed):.0f} dB below the loudest of its {data.shape[1]} channels")
            raise AudioError(
                path,
                f"silent after downmixing to mono: the channels cancel out (phase-inverted stereo?); the mix is "
                f"{level}. Keep one channel instead of averaging them",
            )
    return mono


def _decode_checked(path: Path, max_seconds: float | None, min_seconds: float) -> tuple[np.ndarray, int]:
    """Every check of :func:`load_audio`, up to the resampling: return the mono float32 samples and their rate."""
    if max_seconds is not None and not max_seconds > 0:
        raise ConfigError(f"max_seconds must be positive or None, got {max_seconds!r}")
    if not min_seconds >= 0:
        raise ConfigError(f"min_seconds must be >= 0, got {min_seconds!r}")

    header = _probe(path)
    sr = header.samplerate
    max_frames = None if max_seconds is None else int(np.floor(max_seconds * sr))
    if header.frames is not None:
        if header.frames <= 0:
            raise AudioError(path, "contains no audio samples (0 frames)")
        seconds = float(header.frames) / float(sr)
        if max_seconds is not None and seconds > max_seconds:
            raise _too_long(path, f"{seconds:.2f}", max_seconds)
        if seconds < min_seconds:
            raise AudioError(
                path,
                f"too short: {seconds:.4f} s is below min_seconds={min_seconds:g} s (empty or clipped recording)",
            )

    if header.raw is not None:
        data, sr = _read_raw(path, header)
    elif header.frames is None:
        # Decode one frame past the limit: that is enough to know the file is too long.
        data, _ = _read_unknown_length(path, header, None if max_frames is None else max_frames + 1, keep=True)
        if max_seconds is not None and max_frames is not None and data.shape[0] > max_frames:
            raise _too_long(path, f"more than {max_seconds:g}", max_seconds)
    else:
        try:
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
            raise _unreadable(path, exc) from exc
    # A header can promise more frames than the file holds (truncated downloads); judge what was decoded.
    if data.shape[0] == 0:
        raise AudioError(path, "contains no audio samples (0 frames decoded)")
    if header.exact and header.frames is not None and data.shape[0] < header.frames:
        raise AudioError(
            path,
            f"truncated: the header states {_seconds(header.frames, sr)} but only "
            f"{_seconds(data.shape[0], sr)} could be decoded. Re-download or re-export the file",
        )
    if data.shape[0] / sr < min_seconds:
        raise AudioError(
            path,
            f"too short: only {data.shape[0] / sr:.4f} s could be decoded, below min_seconds={min_seconds:g} s "
            "(is the file truncated?)",
        )
    return validate_waveform(_downmix(data, path), sr, source=str(path)), sr


def validate_audio_file(
    path: str | Path,
    *,
    max_seconds: float | None = MAX_AUDIO_SECONDS,
    min_seconds: float = MIN_AUDIO_SECONDS,
) -> float:
    """Apply every check :func:`load_audio` applies to ``path`` (decoding it, but not resampling); return its
    duration in seconds, or raise :class:`~vgskit.errors.AudioError` naming the file.

    This is what ``vgskit data check`` runs, so that it refuses exactly the files training refuses.
    """
    mono, sr = _decode_checked(Path(path), max_seconds, min_seconds)
    return mono.shape[0] / sr


def load_audio(
    path: str | Path,
    *,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    max_seconds: float | None = MAX_AUDIO_SECONDS,
    min_seconds: float = MIN_AUDIO_SECONDS,
) -> np.ndarray:
    """Load ``path`` as a 1-D float32 mono waveform at ``sample_rate`` Hz.

    Any format libsndfile reads is accepted, at any sample rate and channel count; channels are averaged and
    the result is resampled with soxr. Length limits are checked on the header first, so an over-long file
    is rejected without being decoded (a 10-hour recording would otherwise take gigabytes of memory); where
    the header states no length, decoding stops one frame past ``max_seconds``. A WAV whose 'data' size is 0
    (streaming writers) is read in full; a WAV whose stated size runs past the end of the file is refused as
    truncated, never used in part. The mono signal then passes :func:`validate_waveform`.

    Raises:
        AudioError: the file is missing, unreadable, truncated, empty, shorter than ``min_seconds``, longer
            than ``max_seconds``, contains NaN/Inf samples or samples far outside [-1, 1], is silent or
            constant (a DC offset only, also after down-mixing), or its channels cancel out when averaged.
            The message names the file.
        ConfigError: ``sample_rate``/``max_seconds``/``min_seconds`` are out of range.
    """
    sample_rate = _check_rate("sample_rate", sample_rate)
    mono, sr = _decode_checked(Path(path), max_seconds, min_seconds)
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
