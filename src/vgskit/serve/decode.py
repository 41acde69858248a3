"""Spoken queries from uploaded bytes: recognise the container, decode, check, down-mix and resample.

Uploads are decoded in memory. The format is recognised from the content (RIFF/RF64 WAVE, FLAC, Ogg); the
file name and the declared content type are never used. Once decoded, a query passes the checks every audio
file of vgskit passes (:func:`vgskit.audio.validate_waveform`, the same down-mixing): an upload the
service accepts is one ``vgskit search`` accepts as a file. What can be judged from the header (the duration)
is judged before decoding, so an hour-long upload costs no decoding.

Problems raise :class:`QueryRejected` with the HTTP status to answer and a message naming the problem.
"""

from __future__ import annotations

import io
import struct
import time
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from vgskit.audio import _downmix, resample, validate_waveform
from vgskit.errors import AudioError, VGSKitError

SOURCE = "audio upload"
# libsndfile reports SF_COUNT_MAX frames when a header states no length (a FLAC written to a pipe).
_UNKNOWN_FRAMES = 2**62
# A WAV 'data' size at or above this is a streaming writer's placeholder, never a real size.
_PLACEHOLDER_SIZE = 0x7FFF0000
_CHUNK_FRAMES = 1 << 16
# Containers whose header frame count is exact (fewer decoded frames mean a damaged upload).
_EXACT_LENGTH = frozenset({"WAV", "WAVEX", "RF64", "FLAC"})
# WAV format tag and bits per sample -> libsndfile RAW subtype, for WAVs whose 'data' size is 0.
_RAW_SUBTYPES = {(1, 8): "PCM_U8", (1, 16): "PCM_16", (1, 24): "PCM_24", (1, 32): "PCM_32",
                 (3, 32): "FLOAT", (3, 64): "DOUBLE", (6, 8): "ALAW", (7, 8): "ULAW"}
ACCEPTED = "WAV, FLAC or Ogg (Vorbis, Opus)"


class QueryRejected(VGSKitError):
    """An upload or query that cannot be searched; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class DecodedQuery:
    """A query as the model reads it, and what it took to get there."""

    wav: np.ndarray  # mono float32 at the model's sample rate
    source_rate: int
    channels: int
    container: str
    decode_s: float
    resample_s: float


def sniff(data: bytes) -> str | None:
    """The container of ``data`` from its first bytes: ``"WAV"``, ``"FLAC"``, ``"OGG"``, or None."""
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:4] == b"OggS":
        return "OGG"
    return None


def decode_query(data: bytes, *, sample_rate: int, max_seconds: float) -> DecodedQuery:
    """Decode uploaded audio bytes into a checked mono waveform at ``sample_rate`` Hz.

    Raises :class:`QueryRejected`: 413 when longer than ``max_seconds``; 422 when empty, not WAV/FLAC/Ogg,
    undecodable, truncated, silent, constant, non-finite, or made of channels that cancel out.
    """
    t0 = time.perf_counter()
    if not data:
        raise QueryRejected(422, f"{SOURCE}: empty (0 bytes)")
    container = sniff(data)
    if container is None:
        head = data[:8].hex(" ")
        raise QueryRejected(422, f"{SOURCE}: not a recognised audio format (first bytes {head}); send "
                                 f"{ACCEPTED} (the format is read from the content, not the file name)")
    raw = _wav_raw_layout(data) if container == "WAV" else None
    if raw is not None:
        mono, rate, channels = _decode_raw_wav(data, raw, max_seconds)
        return _finish(mono, rate, channels, container, sample_rate, t0)
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _undecodable(exc) from exc
    rate, channels = int(info.samplerate), int(info.channels)
    if rate <= 0 or channels <= 0:
        raise QueryRejected(422, f"{SOURCE}: header states {channels} channel(s) at {rate} Hz")
    max_frames = int(np.floor(max_seconds * rate))
    frames = None if info.frames >= _UNKNOWN_FRAMES else int(info.frames)
    if frames is not None:
        if frames == 0:
            raise QueryRejected(422, f"{SOURCE}: contains no audio samples (0 frames)")
        if frames > max_frames:
            raise _too_long(f"{frames / rate:.2f} s", max_seconds)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if frames is not None:
                samples = f.read(dtype="float32", always_2d=True)
            else:
                samples = _read_unknown_length(f, channels, max_frames + 1)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _undecodable(exc) from exc
    if samples.shape[0] == 0:
        raise QueryRejected(422, f"{SOURCE}: contains no audio samples (0 frames decoded)")
    if frames is None and samples.shape[0] > max_frames:
        raise _too_long(f"more than {max_seconds:g} s", max_seconds)
    if frames is not None and info.format in _EXACT_LENGTH and samples.shape[0] < frames:
        raise QueryRejected(422, f"{SOURCE}: truncated: the header states {frames} frames but only "
                                 f"{samples.shape[0]} could be decoded")
    if container == "WAV":
        _check_wav_complete(data)
    try:
        mono = _downmix(samples, SOURCE)  # type: ignore[arg-type]
    except AudioError as err:
        raise QueryRejected(422, f"{SOURCE}: {err.problem}") from err
    return _finish(mono, rate, channels, container, sample_rate, t0)


def _finish(mono: np.ndarray, rate: int, channels: int, container: str, sample_rate: int,
            t0: float) -> DecodedQuery:
    try:
        checked = validate_waveform(mono, rate, source=SOURCE)
    except AudioError as err:
        raise QueryRejected(422, f"{SOURCE}: {err.problem}") from err
    t1 = time.perf_counter()
    wav = resample(checked, rate, sample_rate)
    t2 = time.perf_counter()
    return DecodedQuery(wav, rate, channels, container, t1 - t0, t2 - t1)


def _too_long(seconds: str, max_seconds: float) -> QueryRejected:
    return QueryRejected(413, f"{SOURCE}: too long: {seconds} exceeds the limit of {max_seconds:g} s per query; "
                              "trim the recording")


def _undecodable(exc: BaseException) -> QueryRejected:
    reason = str(exc).strip() or type(exc).__name__
    return QueryRejected(422, f"{SOURCE}: cannot decode the audio: corrupt, truncated or unsupported encoding "
                              f"({reason}); send {ACCEPTED}")


def _read_unknown_length(f: sf.SoundFile, channels: int, limit: int) -> np.ndarray:
    """At most ``limit`` frames of a stream whose header states no length.

    ``SoundFile.read`` seeks after every block, which libsndfile cannot do at the end of such a stream, so
    libsndfile's own read call is used, block by block (memory stays bounded by ``limit``).
    """
    lib, ffi = getattr(sf, "_snd", None), getattr(sf, "_ffi", None)
    if lib is None or ffi is None:  # pragma: no cover - every soundfile release so far has both
        raise QueryRejected(422, f"{SOURCE}: the header states no length; re-encode it with the length stated")
    blocks: list[np.ndarray] = []
    total = 0
    buf = np.empty((_CHUNK_FRAMES, channels), dtype=np.float32)
    while total < limit:
        want = min(_CHUNK_FRAMES, limit - total)
        got = int(lib.sf_readf_float(f._file, ffi.cast("float *", buf.ctypes.data), want))
        if got <= 0:
            break
        blocks.append(buf[:got].copy())
        total += got
    return np.concatenate(blocks) if blocks else np.zeros((0, channels), dtype=np.float32)


def _wav_chunks(data: bytes) -> tuple[tuple[int, int, int, int] | None, int, int] | None:
    """``(fmt, data offset, stated data size)`` of a RIFF/WAVE upload (fmt: tag, channels, rate, bits), or None
    where the layout cannot be followed (libsndfile then judges the bytes alone)."""
    fmt: tuple[int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos:pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4:pos + 8])
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(data):
                return None
            tag, channels, rate, _byte_rate, _align, bits = struct.unpack("<HHIIHH", data[body:body + 16])
            if tag == 0xFFFE and size >= 26 and body + 26 <= len(data):  # WAVE_FORMAT_EXTENSIBLE
                (tag,) = struct.unpack("<H", data[body + 24:body + 26])
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            return fmt, body, size
        pos = body + size + (size & 1)
    return None


def _wav_raw_layout(data: bytes) -> tuple[int, int, int, int, int, str] | None:
    """For a WAV whose 'data' size is 0 (streaming writers): (offset, frames, channels, rate, frame bytes,
    RAW subtype); None for any other WAV."""
    if data[:4] != b"RIFF":
        return None
    found = _wav_chunks(data)
    if found is None or found[0] is None or found[2] != 0:
        return None
    (tag, channels, rate, bits), offset, _ = found
    frame_bytes = channels * ((bits + 7) // 8)
    if channels < 1 or rate < 1 or frame_bytes < 1 or len(data) - offset < frame_bytes:
        return None
    subtype = _RAW_SUBTYPES.get((tag, bits))
    if subtype is None:
        raise QueryRejected(422, f"{SOURCE}: the WAV 'data' size is 0 and its format (tag {tag}, {bits} bits) "
                                 "cannot be read without it; re-encode it")
    return offset, (len(data) - offset) // frame_bytes, channels, rate, frame_bytes, subtype


def _decode_raw_wav(data: bytes, layout: tuple[int, int, int, int, int, str],
                    max_seconds: float) -> tuple[np.ndarray, int, int]:
    offset, frames, channels, rate, frame_bytes, subtype = layout
    if frames > max_seconds * rate:
        raise _too_long(f"{frames / rate:.2f} s", max_seconds)
    try:
        samples, _ = sf.read(io.BytesIO(data[offset:offset + frames * frame_bytes]), format="RAW",
                             subtype=subtype, channels=channels, samplerate=rate, endian="LITTLE",
                             dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _undecodable(exc) from exc
    try:
        return _downmix(samples, SOURCE), rate, channels  # type: ignore[arg-type]
    except AudioError as err:
        raise QueryRejected(422, f"{SOURCE}: {err.problem}") from err


def _check_wav_complete(data: bytes) -> None:
    """Refuse a WAV whose 'data' chunk states more bytes than were sent: libsndfile silently decodes the part
    present, and a cut-off upload would be searched as if it were the whole query."""
    if data[:4] != b"RIFF":
        return
    found = _wav_chunks(data)
    if found is None or found[0] is None:
        return
    (_tag, channels, rate, bits), offset, stated = found
    frame_bytes = channels * ((bits + 7) // 8)
    missing = stated - (len(data) - offset)
    if frame_bytes > 0 and rate > 0 and stated < _PLACEHOLDER_SIZE and missing >= frame_bytes:
        total, present = stated // frame_bytes, (len(data) - offset) // frame_bytes
        raise QueryRejected(422, f"{SOURCE}: truncated: the WAV header states {total / rate:.3f} s of audio but "
                                 f"only {present / rate:.3f} s were sent")
