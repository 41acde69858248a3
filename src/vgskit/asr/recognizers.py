"""Pluggable speech recognisers for the speech → ASR → text cascade, and a verified on-disk transcript cache.

A recogniser turns 16 kHz mono float waveforms into transcripts: ``recognizer.transcribe([wav, ...]) -> [str]``.
Each has an ``identity`` (what it is: engine, models and their content hashes, decoding options) that keys the
transcript cache, so a transcript is only ever reused for the same audio *and* the same recogniser.

* :class:`PocketSphinxRecognizer` — offline English CMU PocketSphinx (``pip install pocketsphinx``: the package
  ships an acoustic model, a pronunciation dictionary and a generic language model). Give it caption texts
  (``lm_texts``) and it decodes with a trigram model of them instead (:mod:`vgskit.asr.lm`); words the
  dictionary lacks get a pronunciation when they split into two dictionary words ("pullover" = "pull" +
  "over"), the others are left out of the language model (counted in :attr:`lm_report`).
* :class:`TransformersRecognizer` — a transformers checkpoint (hub name or local folder): Whisper
  (sequence-to-sequence, ``generate``) or a CTC model (wav2vec2 / HuBERT / ... ``ForCTC``, greedy decoding).
  Weights are the user's to download; ``local_files_only`` (or ``HF_HUB_OFFLINE=1``) never touches the network.

:class:`TranscriptCache` stores each transcript as one small JSON file written atomically (temporary file +
rename), named by a hash of the recogniser identity and the audio; a read checks that the file names that same
recogniser and audio hash, so a damaged or foreign entry is recomputed, never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vgskit.errors import ConfigError
from vgskit.fileio import write_text_atomic

__all__ = ["PocketSphinxRecognizer", "Recognizer", "TranscriptCache", "TransformersRecognizer", "audio_sha256"]

log = logging.getLogger(__name__)
SAMPLE_RATE = 16000


class Recognizer(Protocol):
    identity: str

    def transcribe(self, wavs: Sequence[np.ndarray]) -> list[str]: ...


def audio_sha256(wav: np.ndarray) -> str:
    """SHA-256 of a waveform's float32 samples (the cache key of its transcript)."""
    return hashlib.sha256(np.ascontiguousarray(wav, dtype=np.float32).tobytes()).hexdigest()


def _file_sha(path: str | Path) -> str:
    from vgskit.fileio import sha256_file

    return sha256_file(path)[:16]


# ------------------------------------------------------------------------------------------------ pocketsphinx


def _pocketsphinx() -> Any:
    try:
        import pocketsphinx
    except ImportError as exc:
        raise ConfigError("asr.kind 'pocketsphinx' needs the pocketsphinx package: pip install 'vgskit[asr]' "
                          "(or pip install pocketsphinx)") from exc
    return pocketsphinx


def read_dictionary(path: str | Path) -> dict[str, str]:
    """A CMU-format pronunciation dictionary: word → phones of its first pronunciation (``word(2)`` variants are
    the recogniser's business, not the language model's)."""
    words: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            word = parts[0].split("(")[0].lower()
            words.setdefault(word, " ".join(parts[1:]))
    return words


def compound_pronunciation(word: str, dictionary: dict[str, str]) -> str | None:
    """The pronunciation of ``word`` as two dictionary words (longest first part first), or ``None``."""
    for cut in range(len(word) - 2, 1, -1):
        head, tail = word[:cut], word[cut:]
        if head in dictionary and tail in dictionary:
            return f"{dictionary[head]} {dictionary[tail]}"
    return None


class PocketSphinxRecognizer:
    """CMU PocketSphinx (see the module docstring).

    Args:
        acoustic_model: acoustic model folder (default: the package's ``en-us``).
        dictionary: pronunciation dictionary (default: the package's ``cmudict-en-us.dict``).
        language_model: an ARPA or binary language model file; ``None`` with ``lm_texts`` estimates one from
            them, ``None`` without uses the package's generic English model.
        lm_texts: captions to estimate an ``lm_order``-gram domain language model from.
        work_dir: where the estimated ARPA file is written (default: a temporary folder).
    """

    def __init__(self, acoustic_model: str | None = None, dictionary: str | None = None,
                 language_model: str | None = None, lm_texts: Sequence[str] | None = None, lm_order: int = 3,
                 work_dir: str | Path | None = None):
        ps = _pocketsphinx()
        base = Path(ps.get_model_path()) / "en-us"
        self.acoustic_model = str(acoustic_model or base / "en-us")
        self.dictionary = str(dictionary or base / "cmudict-en-us.dict")
        for what, path in (("acoustic model", self.acoustic_model), ("dictionary", self.dictionary)):
            if not Path(path).exists():
                raise ConfigError(f"pocketsphinx {what} {path}: not found")
        if language_model is not None and not Path(language_model).is_file():
            raise ConfigError(f"pocketsphinx language model {language_model}: file not found")
        self.lm_report: dict[str, Any] = {}
        self.extra_words: dict[str, str] = {}
        lm_identity = "generic"
        if language_model is None and lm_texts is not None:
            language_model, lm_identity = self._domain_lm(lm_texts, lm_order, work_dir)
        elif language_model is not None:
            lm_identity = _file_sha(language_model)
        self.language_model = str(language_model or base / "en-us.lm.bin")
        config = ps.Config(hmm=self.acoustic_model, lm=self.language_model, dict=self.dictionary, logfn=os.devnull)
        self.decoder = ps.Decoder(config)
        extra = sorted(self.extra_words.items())
        for i, (word, phones) in enumerate(extra):
            self.decoder.add_word(word, phones, i == len(extra) - 1)  # the search is rebuilt once, at the last
        self.identity = (f"pocketsphinx-{getattr(ps, '__version__', '5')}|am={Path(self.acoustic_model).name}|"
                         f"dict={_file_sha(self.dictionary)}|lm={lm_identity}")

    def _domain_lm(self, texts: Sequence[str], order: int, work_dir: str | Path | None) -> tuple[str, str]:
        import tempfile

        from vgskit.asr.lm import estimate_ngram_model
        from vgskit.asr.wer import normalize_transcript

        dictionary = read_dictionary(self.dictionary)
        for word in sorted({w for t in texts for w in normalize_transcript(t)} - set(dictionary)):
            phones = compound_pronunciation(word, dictionary)
            if phones is not None:
                self.extra_words[word] = phones
        model = estimate_ngram_model(texts, order, vocabulary=set(dictionary) | set(self.extra_words))
        arpa = model.to_arpa()
        digest = hashlib.sha256(arpa.encode("utf-8")).hexdigest()[:16]
        folder = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="vgskit-lm-"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"captions-{order}gram-{digest}.arpa"
        if not path.is_file():
            write_text_atomic(path, arpa)
        self.lm_report = {"order": order, "texts": len(texts), "words": model.total_words,
                          "dropped_oov_words": model.dropped_words, "compound_words": sorted(self.extra_words)}
        if model.dropped_words:
            log.info("domain language model: %d of %d caption words have no pronunciation and were left out",
                     model.dropped_words, model.total_words)
        return str(path), digest

    def transcribe(self, wavs: Sequence[np.ndarray]) -> list[str]:
        out = []
        for wav in wavs:
            pcm = np.clip(np.round(np.asarray(wav, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
            self.decoder.start_utt()
            self.decoder.process_raw(pcm.tobytes(), False, True)
            self.decoder.end_utt()
            hyp = self.decoder.hyp()
            out.append(hyp.hypstr if hyp is not None else "")
        return out


# ------------------------------------------------------------------------------------------------ transformers


class TransformersRecognizer:
    """Whisper or a CTC model through transformers (see the module docstring).

    Args:
        model: hub name or local folder (with its processor / tokenizer files).
        local_files_only: never download (also implied by ``HF_HUB_OFFLINE=1``).
        language: Whisper's language (default English).
        batch_size: waveforms per forward pass.
    """

    def __init__(self, model: str, local_files_only: bool = False, language: str | None = "en", batch_size: int = 8):
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise ConfigError("asr.kind 'transformers' needs transformers: pip install 'vgskit[pretrained]'") from exc
        self.torch = torch
        offline = local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            config = transformers.AutoConfig.from_pretrained(model, local_files_only=offline)
            self.processor = transformers.AutoProcessor.from_pretrained(model, local_files_only=offline)
            self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
            auto = transformers.AutoModelForSpeechSeq2Seq if self.seq2seq else transformers.AutoModelForCTC
            self.model = auto.from_pretrained(model, local_files_only=offline).eval()
        except (OSError, ValueError) as exc:
            where = "the local cache (offline)" if offline else "the Hugging Face Hub or a local folder"
            raise ConfigError(f"ASR model {model!r}: cannot be loaded from {where}: {exc}") from exc
        self.language = language
        self.batch_size = int(batch_size)
        names = sorted(p for p in Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
        weights = ",".join(_file_sha(p) for p in names) if names else getattr(config, "_commit_hash", None) or "hub"
        self.identity = f"transformers|{type(self.model).__name__}|{model}|{weights}|lang={language}"

    def transcribe(self, wavs: Sequence[np.ndarray]) -> list[str]:
        torch = self.torch
        out: list[str] = []
        for start in range(0, len(wavs), self.batch_size):
            chunk = [np.asarray(w, dtype=np.float32) for w in wavs[start:start + self.batch_size]]
            inputs = self.processor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True)
            with torch.no_grad():
                if self.seq2seq:
                    kwargs = {"language": self.language} if self.language else {}
                    ids = self.model.generate(**inputs, **kwargs)
                else:
                    ids = self.model(**inputs).logits.argmax(dim=-1)  # [B, T] greedy CTC path
            out.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return out


# ------------------------------------------------------------------------------------------------ cache


class TranscriptCache:
    """Transcripts on disk, one verified JSON file per (recogniser, audio) pair (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.unwritable = False

    def _path(self, identity: str, audio_sha: str) -> Path:
        key = hashlib.sha256(f"{identity}\n{audio_sha}".encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.json"

    def get(self, identity: str, audio_sha: str) -> str | None:
        path = self._path(identity, audio_sha)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            log.warning("transcript cache entry %s is damaged; transcribing again", path)
            return None
        if (not isinstance(entry, dict) or entry.get("asr") != identity or entry.get("audio_sha256") != audio_sha
                or not isinstance(entry.get("text"), str)):
            log.warning("transcript cache entry %s does not belong to this audio and recogniser; transcribing again",
                        path)
            return None
        return entry["text"]

    def put(self, identity: str, audio_sha: str, text: str) -> None:
        """Store a transcript. A folder that cannot be written (read-only, full) is reported once and the cache is
        then skipped: the transcripts are still returned, only not kept."""
        if self.unwritable:
            return
        path = self._path(identity, audio_sha)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"asr": identity, "audio_sha256": audio_sha, "text": text}))
        except OSError as exc:
            self.unwritable = True
            log.warning("transcript cache %s cannot be written (%s); transcripts are not cached", self.folder, exc)
