"""Measured word alignments of the spoken-scenes captions, for evaluating word discovery offline.

Every espeak-ng caption of a spoken-scenes corpus is synthesized again through the espeak-ng library
(``libespeak-ng.so.1``, loaded with :mod:`ctypes`) with the voice, speed and pitch named by its ``speaker``, as
``espeak-ng -v VOICE -s SPEED -p PITCH -w OUT.wav -- TEXT`` made it. Alongside the audio the library reports events
at exact output samples: a word event where the synthesizer starts generating a word, and a phoneme event where it
starts each phoneme (pauses included). The audio is put through the corpus's own resampling and trimming
(:func:`vgskit.data.synthetic._to_16k_trimmed`) and must equal the stored WAV sample for sample, so an alignment
describes the stored audio and not a look-alike: a caption whose WAV differs (another espeak-ng version made the
corpus, say) gets no alignment rather than an approximate one.

Word boundaries (:func:`_word_starts`, :func:`_word_sample_spans`):

* A word owns the audio from its word event to the next word's event (the end of the audio for the last word).
  Where espeak-ng speaks two words as one dictionary entry ("of a", "on the") there is one word event for both;
  the second word then starts at the phoneme event where its phonemes begin.
* The word **starts** at its first phoneme event when the stretch before it is quiet (the pre-pause espeak-ng puts
  before some words: silence, or the echo of the previous word in voice variants with echo); otherwise (a vowel
  after a nasal or liquid, whose phoneme event espeak-ng reports only after the vowel's onset) at the word event.
* The word **ends** at the first pause phoneme after its start (a comma's pause, the end of the utterance),
  else where the next word starts.
* Digital silence left at either edge is cut off.

So adjacent words share a boundary where the speech runs on, and pauses (and the echo tail that some voice variants
leave after the last word) belong to no word, as in the reference alignments of real corpora. Times are seconds
from the start of the stored (trimmed, 16 kHz) WAV.

flite captions get ``None`` (missing). ``flite -psdur`` prints the segment end times of flite's duration model,
which are targets: the waveform follows them only as closely as its units' pitch periods fall (a comma's pause
printed at 1.103-1.323 s is silent over about 1.095-1.325 s of a kal16 caption, and the final pause is cut short,
2.557 s printed for 2.444 s of audio), and the command-line program does not say which segments make up which
word. Nothing measured is available, so no times are given; a missing alignment is reported as missing and never
filled in by a guess.

The alignments are computed once per corpus into ``<corpus>/word_alignments.json`` (:func:`word_alignments`) and
read with :func:`load_word_alignments`, which checks that the file is intact and belongs to the corpus as it is now.
From the command line: ``python -m vgskit.data.scene_alignments CORPUS_DIR``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import math
import os
import pickle
import re
import sys
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soxr

from vgskit.data.synthetic import SAMPLE_RATE, _to_16k_trimmed, corpus_lock
from vgskit.errors import AudioError, VGSKitError
from vgskit.fileio import write_text_atomic

if TYPE_CHECKING:
    from vgskit.segmentation.alignments import WordInterval

# vgskit.segmentation (WordInterval, AlignmentError) imports torch, and forking a process that has torch loaded
# costs ~15 ms against ~2 ms without it, once per caption. The synthesis workers therefore never import it: it is
# imported where files are verified and read.

__all__ = [
    "ALIGNMENTS_FILE",
    "FORMAT_VERSION",
    "PREPAUSE_LEVEL",
    "SILENCE_LEVEL",
    "EspeakSynthesis",
    "espeak_synthesize",
    "load_word_alignments",
    "word_alignments",
]

#: Name of the alignment file inside a corpus folder.
ALIGNMENTS_FILE = "word_alignments.json"
#: Bump whenever the way boundaries are measured changes, so that stored files are rebuilt.
FORMAT_VERSION = 1
#: Largest absolute int16 value counted as silence when trimming pauses off word edges. espeak-ng writes pauses as
#: exact zeros; a couple of LSB of slack (-84 dBFS) also covers the last ripple of a decaying sound, which no
#: listener or model can hear.
SILENCE_LEVEL = 2

#: Fraction of an utterance's peak amplitude below which the stretch between a word's event and its first phoneme
#: event counts as a pause. Over 1,000 such stretches of demo captions fall in two groups, at most 0.04 of the
#: peak (silence or echo) or at least 0.35 (a vowel already sounding), so the value is not critical.
PREPAUSE_LEVEL = 0.1

_FILE_KIND = "spoken-scenes-word-alignments"
_ESPEAK_LIBRARY = "libespeak-ng.so.1"
_SPEAKER = re.compile(r"espeak:(?P<voice>[^:]+):s(?P<speed>\d+):p(?P<pitch>\d+)")
# Punctuation the caption grammar writes next to words; it is not part of the spoken word.
_PUNCTUATION = ",.;:!?\"'()"

# espeak-ng constants, from speak_lib.h (API revision 12).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_INITIALIZE_PHONEME_EVENTS = 0x0001
_POS_CHARACTER = 1
_CHARS_AUTO = 0
_PHONEMES = 0x100
_ENDPAUSE = 0x1000
_PARAM_RATE = 1
_PARAM_PITCH = 3
# The flags espeak-ng's command-line program passes to espeak_Synth for text given on its command line.
_CLI_SYNTH_FLAGS = _CHARS_AUTO | _PHONEMES | _ENDPAUSE


class _EspeakEvent(ctypes.Structure):
    """``espeak_EVENT`` of speak_lib.h; the union ``id`` is read as its 8-byte ``string`` member."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character index of the word in the text
        ("length", ctypes.c_int),  # word length in characters (word events)
        ("audio_position", ctypes.c_int),  # milliseconds, rounded down: too coarse, ``sample`` is used instead
        ("sample", ctypes.c_int),  # output sample index at which the event happens
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


class _EspeakVoice(ctypes.Structure):
    """``espeak_VOICE`` of speak_lib.h, used to select a voice by language."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)


@dataclass(frozen=True)
class EspeakSynthesis:
    """Audio and events of one espeak-ng synthesis.

    Attributes:
        samples: int16 mono audio at ``sample_rate``, exactly what ``espeak-ng -w`` writes.
        sample_rate: the voice's native rate (22050 Hz for the espeak-ng voices).
        words: ``(char_index, length, sample)`` per word event: 0-based position and length of the word in the
            text, and the output sample at which the synthesizer starts generating it.
        phonemes: ``(char_index, sample, name)`` per phoneme event: the 0-based position of the word the phoneme
            belongs to, the sample at which its synthesis starts, and its espeak-ng name (pauses start with ``_``).
        pronunciations: for each word asked for, the espeak-ng phoneme names of the word spoken on its own.
    """

    samples: np.ndarray
    sample_rate: int
    words: list[tuple[int, int, int]]
    phonemes: list[tuple[int, int, str]]
    pronunciations: dict[str, list[str]]


class _Espeak:
    """The espeak-ng library of this process, initialised once for synchronous retrieval of audio and events."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("espeak-ng") or _ESPEAK_LIBRARY
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as exc:
            raise VGSKitError(
                f"the espeak-ng library ({path}) cannot be loaded ({exc}); install it with: apt-get install espeak-ng"
            ) from None
        # Phoneme events only add markers to the synthesizer's queue; the audio is checked to be unchanged.
        self.sample_rate = int(
            self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS)
        )
        if self.sample_rate <= 0:
            raise VGSKitError(f"espeak_Initialize of {path} failed (returned {self.sample_rate}); is espeak-ng-data "
                              "installed?")
        self._chunks: list[bytes] = []
        self._events: list[tuple[int, int, int]] = []
        self._phonemes: list[tuple[int, int, str]] = []
        # Kept on the instance: the library holds the pointer, and a collected callback would crash it.
        self._callback = _SynthCallback(self._on_audio)
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_EspeakVoice)]
        self.lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        self.lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]

    def _on_audio(self, wav: Any, n: int, events: Any) -> int:
        if wav and n > 0:
            self._chunks.append(ctypes.string_at(wav, 2 * n))
        i = 0
        while events and events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_WORD:
                self._events.append((ev.text_position - 1, ev.length, ev.sample))
            elif ev.type == _EVENT_PHONEME:
                name = bytes(ev.id).split(b"\0", 1)[0].decode("utf-8", errors="replace")
                self._phonemes.append((ev.text_position - 1, ev.sample, name))
            i += 1
        return 0  # continue synthesis

    def _pronounce(self, word: str) -> list[str]:
        """Phoneme names of ``word`` spoken on its own, in the current voice (its translation, no audio)."""
        buffer = ctypes.create_string_buffer(word.encode("utf-8"))
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        # Mode: espeak-ng phoneme names, separated by "|" (bits 8-15 of the mode give the separator).
        out = self.lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_AUTO, ord("|") << 8)
        names = (out or b"").decode("utf-8", errors="replace").replace(" ", "|").split("|")
        # Stress marks are written before a syllable's vowel; they are not phonemes of their own.
        names = [n.lstrip("',%=") for n in names]
        return [n for n in names if n and not n.startswith("_")]

    def _synthesize_here(
        self, text: str, voice: str, speed: int, pitch: int, pronounce: tuple[str, ...]
    ) -> tuple[bytes, list, list, dict]:
        """Synthesize in this process: raw int16 bytes, word and phoneme events, and the pronunciations of the
        words in ``pronounce``. Changes the library's state."""
        status = self.lib.espeak_SetVoiceByName(voice.encode("utf-8"))
        if status != 0:
            # espeak-ng's command-line program falls back to choosing the voice by language when the name is
            # not a voice file ("en-gb+f4": the en-gb voice is named "gb"), so the same is done here.
            select = _EspeakVoice(languages=voice.encode("utf-8"))
            status = self.lib.espeak_SetVoiceByProperties(ctypes.byref(select))
        if status != 0:
            raise VGSKitError(f"espeak-ng has no voice {voice!r} (error {status})")
        # Rate and pitch after the voice, in the order of the command-line program.
        self.lib.espeak_SetParameter(_PARAM_RATE, int(speed), 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self._chunks, self._events, self._phonemes = [], [], []
        raw = text.encode("utf-8")
        status = self.lib.espeak_Synth(raw, len(raw) + 1, 0, _POS_CHARACTER, 0, _CLI_SYNTH_FLAGS, None, None)
        if status != 0:
            raise VGSKitError(f"espeak_Synth failed on {text!r} with voice {voice!r} (error {status})")
        # After the synthesis: translating text moves the library's state on, which must not touch the audio.
        pronunciations = {word: self._pronounce(word) for word in pronounce}
        return b"".join(self._chunks), list(self._events), list(self._phonemes), pronunciations

    def synthesize(
        self, text: str, voice: str, speed: int, pitch: int, pronounce: tuple[str, ...] = ()
    ) -> EspeakSynthesis:
        """Synthesize in a forked child, from the library's freshly initialised state.

        A synthesis leaves state behind in the library (its wave generator carries on from where the last
        utterance stopped), so a second synthesis in one process differs from what ``espeak-ng`` run afresh
        writes, and espeak_Terminate followed by espeak_Initialize hangs. This process therefore never
        synthesizes: each utterance is made in a child forked from it, which starts from exactly the state the
        command-line program starts from, and sends back its audio and events through a pipe.
        """
        if not hasattr(os, "fork"):
            raise VGSKitError("re-synthesizing espeak-ng captions needs os.fork (a POSIX system)")
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: no Python cleanup on the way out (os._exit), the parent owns every resource
            code = 0
            try:
                os.close(read_fd)
                try:
                    payload = pickle.dumps(("ok", self._synthesize_here(text, voice, speed, pitch, pronounce)))
                except BaseException as exc:  # reported to the parent, which raises it
                    payload, code = pickle.dumps(("error", str(exc))), 1
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(payload)
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            payload = pipe.read()
        _, wait_status = os.waitpid(pid, 0)
        if not payload:
            raise VGSKitError(f"espeak-ng synthesis of {text!r} with voice {voice!r} died "
                              f"(wait status {wait_status})")
        kind, result = pickle.loads(payload)
        if kind != "ok":
            raise VGSKitError(result)
        audio, words, phonemes, pronunciations = result
        return EspeakSynthesis(np.frombuffer(audio, dtype=np.int16), self.sample_rate, words, phonemes,
                               pronunciations)


_ENGINE: _Espeak | None = None


def espeak_synthesize(
    text: str, voice: str, speed: int, pitch: int, pronounce: tuple[str, ...] = ()
) -> EspeakSynthesis:
    """Synthesize ``text`` with espeak-ng as ``espeak-ng -v voice -s speed -p pitch -w out.wav -- text`` does.

    ``pronounce`` names words whose stand-alone pronunciation (phoneme names, in the same voice) is wanted too.

    The library is loaded and initialised on first use, once per process (it keeps global state, so concurrent
    synthesis needs processes, not threads).
    """
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Espeak()
    return _ENGINE.synthesize(text, voice, speed, pitch, pronounce)


# --------------------------------------------------------------------------------------------------------------
# From word events to word intervals
# --------------------------------------------------------------------------------------------------------------


def _caption_words(text: str) -> list[tuple[int, int, str]]:
    """``(first_char, end_char, word)`` of each whitespace-separated word, surrounding punctuation removed."""
    out = []
    for m in re.finditer(r"\S+", text):
        token = m.group()
        lead = len(token) - len(token.lstrip(_PUNCTUATION))
        word = token.strip(_PUNCTUATION)
        if word:
            out.append((m.start() + lead, m.start() + lead + len(word), word))
    return out


def _word_starts(
    words: list[tuple[int, int, str]], synthesis: EspeakSynthesis
) -> tuple[list[int] | None, str]:
    """The sample at which the synthesizer starts each caption word, or ``None`` and why it cannot be told.

    Word events are matched to the caption's words by character position; espeak-ng may split a written word
    (``t-shirt``) into several events, of which the first counts. It also speaks some word pairs as one dictionary
    entry ("of a", "on the") with a single word event; the entry's phoneme events then decide where the second
    word starts: the entry's phonemes are divided in the order of the words, each word taking as many as it has
    when spoken on its own. When those counts do not add up to the entry's phonemes, the division is not known
    and the caption gets no alignment.
    """
    first_event: dict[int, int] = {}
    last_owner = -1
    for char, length, sample in synthesis.words:
        if length == 0:
            continue  # espeak-ng closes an utterance with an empty word event; it marks no word
        k = next((i for i, (a, b, _) in enumerate(words) if a <= char < b), None)
        if k is None:
            return None, f"word event at character {char} falls on no word"
        if k < last_owner:
            return None, "word events out of text order"
        last_owner = k
        first_event.setdefault(k, sample)
    if 0 not in first_event:
        return None, f"no word event for the first word {words[0][2]!r}" if words else "caption has no words"
    starts: list[int] = []
    k = 0
    while k < len(words):
        # A word with an event, followed by the words (if any) that its dictionary entry also speaks.
        group = [k]
        while group[-1] + 1 < len(words) and group[-1] + 1 not in first_event:
            group.append(group[-1] + 1)
        starts.append(first_event[k])
        if len(group) > 1:
            lo, hi = words[group[0]][0], words[group[-1]][1]
            samples = [smp for char, smp, name in synthesis.phonemes if lo <= char < hi and not name.startswith("_")]
            counts = [len(synthesis.pronunciations.get(words[i][2], ())) for i in group]
            if sum(counts) != len(samples) or 0 in counts:
                spoken = " ".join(words[i][2] for i in group)
                return None, (f"{spoken!r} is spoken as one entry of {len(samples)} phonemes, which its words' "
                              f"own pronunciations ({counts} phonemes) do not divide")
            edge = 0
            for count in counts[:-1]:
                edge += count
                starts.append(samples[edge])
        k = group[-1] + 1
    if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        return None, "word starts are not increasing"
    return starts, "ok"


def _word_sample_spans(text: str, synthesis: EspeakSynthesis) -> tuple[list[tuple[str, int, int]] | None, str]:
    """Each caption word with its first and end sample in the native-rate audio, or ``None`` and why not.

    A word owns the audio from its start (:func:`_word_starts`) to the next word's start (or the end of the
    audio), less the pauses at both edges, which the synthesizer's own events delimit:

    * before the word's first phoneme event the synthesizer may insert a pre-pause. The stretch before that event
      is left out when it is quiet (below :data:`PREPAUSE_LEVEL` of the utterance's peak): it then holds only
      silence, or the echo of the previous word in voices with echo. It is kept when it sounds: espeak-ng reports
      a vowel that follows a nasal or a liquid only after the vowel's onset, so the word has begun before it.
    * the word ends at the first pause phoneme (named ``_...``: a comma's pause, the end of the utterance) after
      its start.

    Samples within :data:`SILENCE_LEVEL` of zero at either edge of what remains are cut off as well.
    """
    words = _caption_words(text)
    starts, why = _word_starts(words, synthesis)
    if starts is None:
        return None, why
    magnitude = np.abs(synthesis.samples.astype(np.int32))
    peak = int(magnitude.max()) if magnitude.size else 0
    loud = np.flatnonzero(magnitude > SILENCE_LEVEL)
    spans = []
    for k, (_, _, word) in enumerate(words):
        start = starts[k]
        stop = starts[k + 1] if k + 1 < len(words) else len(synthesis.samples)
        first = next((smp for _, smp, name in synthesis.phonemes
                      if start <= smp < stop and not name.startswith("_")), None)
        if first is not None and first > start and magnitude[start:first].max() < PREPAUSE_LEVEL * peak:
            start = first
        end = next((smp for _, smp, name in synthesis.phonemes
                    if start < smp < stop and name.startswith("_")), stop)
        lo, hi = np.searchsorted(loud, start), np.searchsorted(loud, end)
        if hi <= lo:
            return None, f"word {word!r} has no sound of its own"
        spans.append((word, int(loud[lo]), int(loud[hi - 1]) + 1))
    return spans, "ok"


def _trim_bounds_16k(samples: np.ndarray, sr: int) -> tuple[int, int]:
    """First and end index, in the resampled 16 kHz signal, of what ``_to_16k_trimmed(samples, sr)`` keeps.

    Mirrors the trimming rule of :func:`vgskit.data.synthetic._to_16k_trimmed` (keep 0.1 s beyond the first and
    the last sample louder than 0.01), which returns only the kept samples; the caller checks the kept length
    against that function's output, so a change of the rule there cannot go unnoticed.
    """
    if sr != SAMPLE_RATE:
        samples = soxr.resample(samples, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    if not loud.size:
        return 0, len(samples)
    pad = SAMPLE_RATE // 10
    start = max(0, int(loud[0]) - pad)
    return start, start + len(samples[start : int(loud[-1]) + pad])  # slicing clips the end as the corpus does


def _read_wav_int16(path: Path) -> np.ndarray:
    """Samples of a corpus WAV (16-bit mono PCM at 16 kHz), as the corpus writes them."""
    try:
        with wave.open(str(path), "rb") as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, SAMPLE_RATE):
                raise AudioError(path, f"expected 16-bit mono {SAMPLE_RATE} Hz PCM, found {w.getnchannels()} "
                                           f"channel(s), {8 * w.getsampwidth()} bit, {w.getframerate()} Hz")
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    except (OSError, EOFError, wave.Error) as exc:
        raise AudioError(path, f"cannot be read as a WAV file ({exc})") from None


def _align_caption(task: dict) -> tuple[str, list[list[Any]] | None, str]:
    """Alignment of one caption: ``(caption_id, [[word, start_s, end_s], ...] or None, status)``.

    ``status`` is ``"ok"``, ``"flite"`` (no measured times), ``"wav_mismatch: ..."`` (the re-synthesis is not the
    stored audio) or ``"unmappable: ..."`` (the word events do not map onto the caption's words).
    """
    caption_id, text, speaker = task["caption_id"], task["text"], task["speaker"]
    if speaker.startswith("flite:"):
        return caption_id, None, "flite"
    m = _SPEAKER.fullmatch(speaker)
    if m is None:
        raise VGSKitError(f"caption {caption_id}: speaker {speaker!r} is neither 'flite:...' nor "
                          "'espeak:VOICE:sSPEED:pPITCH'")
    vocabulary = tuple(dict.fromkeys(word for _, _, word in _caption_words(text)))
    try:
        synthesis = espeak_synthesize(text, m["voice"], int(m["speed"]), int(m["pitch"]), vocabulary)
    except VGSKitError as exc:
        raise VGSKitError(f"caption {caption_id} ({task['wav']}): {exc}") from None
    # The same float conversion as reading espeak-ng's 16-bit WAV with soundfile in the corpus generator.
    as_float = synthesis.samples.astype(np.float32) / np.float32(32768.0)
    produced = _to_16k_trimmed(as_float, synthesis.sample_rate)
    stored = _read_wav_int16(Path(task["wav"]))
    if produced.shape != stored.shape or not np.array_equal(produced, stored):
        n = min(len(produced), len(stored))
        differing = int(np.count_nonzero(produced[:n] != stored[:n]))
        return caption_id, None, (f"wav_mismatch: {len(produced)} samples re-synthesized vs {len(stored)} stored, "
                                  f"{differing} differ in the common part")
    spans, why = _word_sample_spans(text, synthesis)
    if spans is None:
        return caption_id, None, f"unmappable: {why}"
    offset, stop = _trim_bounds_16k(as_float, synthesis.sample_rate)
    if stop - offset != len(produced):
        raise VGSKitError(f"caption {caption_id}: the trimming rule of vgskit.data.synthetic._to_16k_trimmed has "
                          f"changed ({len(produced)} samples kept, {stop - offset} expected); update "
                          "_trim_bounds_16k to match it")
    duration = len(stored) / SAMPLE_RATE
    scale = 1.0 / synthesis.sample_rate
    shift = offset / SAMPLE_RATE
    words = []
    for word, a, b in spans:
        # soxr's resampler is linear-phase with its delay removed, so native time maps to 16 kHz time directly.
        start = min(max(a * scale - shift, 0.0), duration)
        end = min(max(b * scale - shift, 0.0), duration)
        words.append([word, round(start, 5), round(end, 5)])
    return caption_id, words, "ok"


# --------------------------------------------------------------------------------------------------------------
# The corpus file
# --------------------------------------------------------------------------------------------------------------


def _read_corpus_marker(corpus: Path) -> dict:
    path = corpus / "corpus.json"
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VGSKitError(f"{path}: missing or unreadable ({exc}); {corpus} is not a complete spoken-scenes corpus "
                          "(generate it first)") from None
    if not isinstance(marker, dict) or marker.get("corpus") != "spoken-scenes":
        raise VGSKitError(f"{path}: not a spoken-scenes corpus marker")
    return marker


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_tasks(corpus: Path) -> tuple[list[dict], str]:
    """One task per manifest line (caption id, text, speaker, WAV path) and the manifest's SHA-256."""
    path = corpus / "manifest.jsonl"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VGSKitError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    tasks = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            tasks.append({"caption_id": str(rec["caption_id"]), "text": str(rec["text"]),
                          "speaker": str(rec["speaker"]), "wav": str(corpus / rec["audio"])})
        except (ValueError, KeyError, TypeError) as exc:
            raise VGSKitError(f"{path} line {lineno}: not a spoken-scenes record ({exc})") from None
    return tasks, _sha256_bytes(raw)


def _alignments_digest(alignments: dict[str, Any]) -> str:
    """SHA-256 of the alignments in a canonical JSON form (key order and spacing fixed)."""
    canonical = json.dumps(alignments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _sha256_bytes(canonical.encode("utf-8"))


def _wavs_digest(tasks: list[dict]) -> str:
    """SHA-256 over the bytes of every caption WAV, in manifest order.

    The manifest alone does not pin the audio down: regenerating a corpus with the same config but another
    espeak-ng version rewrites the WAVs under the same manifest, and the alignments of the old audio would no
    longer hold. Hashing ~100 MB of WAVs takes about a second.
    """
    digest = hashlib.sha256()
    for task in tasks:
        try:
            digest.update(Path(task["wav"]).read_bytes())
        except OSError as exc:
            raise AudioError(task["wav"], f"cannot be read ({exc.strerror or exc}); is the corpus complete?") from None
    return digest.hexdigest()


def _corpus_state(corpus: Path) -> tuple[list[dict], dict]:
    """The corpus's caption tasks and what its alignments depend on: the alignment format, the corpus marker,
    and SHA-256s of the manifest and of the audio."""
    marker = _read_corpus_marker(corpus)
    tasks, manifest_sha = _manifest_tasks(corpus)
    identity = {"kind": _FILE_KIND, "format_version": FORMAT_VERSION, "corpus": marker,
                "manifest_sha256": manifest_sha, "wavs_sha256": _wavs_digest(tasks)}
    return tasks, identity


def _iter_results(tasks: list[dict], workers: int, progress: bool) -> Iterator[tuple[str, Any, str]]:
    from tqdm import tqdm

    with tqdm(total=len(tasks), desc="word alignments", unit="caption", disable=not progress) as bar:
        if workers <= 1 or len(tasks) < 200:
            for task in tasks:
                yield _align_caption(task)
                bar.update(1)
            return
        import multiprocessing as mp

        # Processes, not threads: the espeak-ng library keeps global synthesis state. Chunks of a few dozen
        # captions (~1 s of work) keep the bar live at negligible overhead.
        with mp.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(_align_caption, tasks, chunksize=32):
                yield result
                bar.update(1)


def _check_file(path: Path, wanted: dict, caption_ids: list[str]) -> dict[str, list[WordInterval] | None]:
    """Parse and verify an alignment file; raise :class:`AlignmentError` naming what is wrong."""
    from vgskit.segmentation.alignments import AlignmentError, WordInterval

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AlignmentError(path, "not found; compute it with vgskit.data.scene_alignments.word_alignments") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AlignmentError(path, f"cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise AlignmentError(path, f"line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), dict):
        raise AlignmentError(path, "not a spoken-scenes word alignment file (no 'alignments' object)")
    for key in ("kind", "format_version", "corpus", "manifest_sha256", "wavs_sha256"):
        if data.get(key) != wanted[key]:
            raise AlignmentError(path, f"stale: its {key} is {data.get(key)!r}, the corpus needs {wanted[key]!r}; "
                                       "recompute it with word_alignments()")
    alignments = data["alignments"]
    if _alignments_digest(alignments) != data.get("alignments_sha256"):
        raise AlignmentError(path, "corrupted: the alignments do not match their recorded SHA-256")
    if set(alignments) != set(caption_ids):
        missing = sorted(set(caption_ids) - set(alignments))[:5]
        extra = sorted(set(alignments) - set(caption_ids))[:5]
        raise AlignmentError(path, f"does not cover the manifest's captions (missing e.g. {missing}, "
                                   f"unknown e.g. {extra})")
    out: dict[str, list[WordInterval] | None] = {}
    for caption_id, words in alignments.items():
        if words is None:
            out[caption_id] = None
            continue
        try:
            intervals = [WordInterval(str(w), float(s), float(e)) for w, s, e in words]
        except (TypeError, ValueError) as exc:
            raise AlignmentError(path, f"caption {caption_id}: invalid word entry ({exc})") from None
        if any(b.start < a.end - 1e-9 for a, b in zip(intervals, intervals[1:], strict=False)):
            raise AlignmentError(path, f"caption {caption_id}: words overlap or are out of order")
        out[caption_id] = intervals
    return out


def load_word_alignments(corpus_dir: str | Path) -> dict[str, list[WordInterval] | None]:
    """The word alignments of a spoken-scenes corpus, verified, keyed by caption id.

    Every caption of the manifest is a key; its value is the caption's words in order with their times in seconds
    from the start of its WAV, or ``None`` when they could not be measured (flite captions, or a stored WAV that
    the synthesizer no longer reproduces).

    Raises:
        AlignmentError: the file is missing, unreadable, corrupted (its content does not match its recorded
            SHA-256) or stale (it was computed for another corpus, another manifest, or an older format).
    """
    corpus = Path(corpus_dir)
    tasks, identity = _corpus_state(corpus)
    return _check_file(corpus / ALIGNMENTS_FILE, identity, [t["caption_id"] for t in tasks])


def word_alignments(corpus_dir: str | Path, *, progress: bool = True, workers: int | None = None) -> Path:
    """Compute ``<corpus>/word_alignments.json`` (unless a valid one exists) and return its path.

    Re-synthesizes every espeak-ng caption (see the module documentation for how boundaries are measured and
    checked). The work runs under the corpus lock, so it never races a generation of the same corpus, and the file
    is written atomically, with the corpus marker, the manifest's SHA-256, the format version and a SHA-256 of the
    alignments, so that :func:`load_word_alignments` can refuse a stale or corrupted file and this function
    recomputes it when the corpus changed.

    Args:
        corpus_dir: a generated spoken-scenes corpus folder (holding ``corpus.json`` and ``manifest.jsonl``).
        progress: show a progress bar.
        workers: processes to use; default: the CPU count.

    Returns:
        The path of ``word_alignments.json``.
    """
    from vgskit.segmentation.alignments import AlignmentError

    corpus = Path(corpus_dir)
    path = corpus / ALIGNMENTS_FILE
    try:
        load_word_alignments(corpus)
        return path
    except AlignmentError:
        pass  # missing, stale or damaged: compute it
    with corpus_lock(corpus, progress):
        tasks, wanted = _corpus_state(corpus)
        try:
            _check_file(path, wanted, [t["caption_id"] for t in tasks])
            return path  # computed by the process we waited for
        except AlignmentError:
            pass
        alignments: dict[str, Any] = {}
        counts: dict[str, int] = {}
        mismatches: list[str] = []
        n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        for caption_id, words, status in _iter_results(tasks, n_workers, progress):
            alignments[caption_id] = words
            kind = status.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
            if kind != "ok" and kind != "flite" and len(mismatches) < 20:
                mismatches.append(f"{caption_id}: {status}")
        data = {**wanted, "sample_rate": SAMPLE_RATE, "silence_level": SILENCE_LEVEL, "counts": counts,
                "unaligned_examples": mismatches, "alignments_sha256": _alignments_digest(alignments),
                "alignments": alignments}
        write_text_atomic(path, json.dumps(data, ensure_ascii=False))
    if progress:
        print(f"{path}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    return path


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m vgskit.data.scene_alignments CORPUS_DIR", file=sys.stderr)
        return 2
    try:
        path = word_alignments(argv[0])
        found = load_word_alignments(argv[0])
    except VGSKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    aligned = sum(v is not None for v in found.values())
    print(f"{path}: {aligned} of {len(found)} captions aligned ({math.floor(100 * aligned / max(1, len(found)))}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
