"""The speech → ASR → text cascade MILAN is compared against (Sanabria et al. 2021, Table 5), as a retrieval model.

``asr_cascade`` transcribes each spoken caption with a pluggable recogniser (:mod:`vgskit.asr.recognizers`) and
embeds the transcript with a trained text dual encoder (:class:`~vgskit.models.milan.text.MilanText`), whose
image tower embeds the images. It has no weights of its own to train (``trainable = False``): it is built by
name and evaluated through the generic evaluator like any model. The three rows of the paper's Table 5 are::

    vgskit eval --checkpoint runs/milan --manifest M                        # speech, encoded directly
    vgskit eval --model asr_cascade --manifest M --asr-wer \\
        --set text_model=runs/milan_text --set asr.lm_manifest=M            # speech → ASR → text (+ its WER)
    vgskit eval --model asr_cascade --manifest M \\
        --set text_model=runs/milan_text --set asr.kind=transcripts         # ground-truth text (topline)

``asr.kind``: ``pocketsphinx`` (offline; with ``asr.lm_manifest`` its language model is a trigram model of that
manifest's ``asr.lm_split`` captions, otherwise the package's generic English model), ``transformers``
(``asr.model``: a Whisper or CTC checkpoint, hub name or folder) or ``transcripts`` (the manifest's own text: the
model then reads transcripts, ``speech_input = "text"``, and no audio is decoded). Transcripts are cached on
disk (``asr.cache_dir``, default ``$VGSKIT_CACHE/transcripts``; ``""`` turns the cache off), keyed by the audio
and the recogniser, so the WER evaluation and later runs reuse what the recall pass transcribed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vgskit.contract import Embeddings, ImageInputs, SpeechInputs
from vgskit.errors import ConfigError
from vgskit.models.base import RetrievalModel
from vgskit.models.registry import register_model

__all__ = ["ASR_KINDS", "AsrCascade", "AsrCascadeConfig", "AsrConfig"]

ASR_KINDS = ("pocketsphinx", "transformers", "transcripts")


@dataclass
class AsrConfig:
    """The recogniser of :class:`AsrCascade` (see the module docstring).

    Attributes:
        kind: one of :data:`ASR_KINDS`.
        model: ``transformers``: hub name or folder; ``pocketsphinx``: acoustic model folder (default: packaged).
        dictionary: ``pocketsphinx`` pronunciation dictionary (default: the packaged CMUdict).
        language_model: ``pocketsphinx`` ARPA / binary language model file (overrides ``lm_manifest``).
        lm_manifest, lm_split, lm_order: estimate the language model from these captions.
        cache_dir: transcript cache folder (``None``: ``$VGSKIT_CACHE/transcripts``; ``""``: no cache).
        local_files_only: ``transformers``: never download.
        language: ``transformers`` Whisper language.
    """

    kind: str = "pocketsphinx"
    model: str | None = None
    dictionary: str | None = None
    language_model: str | None = None
    lm_manifest: str | None = None
    lm_split: str = "train"
    lm_order: int = 3
    cache_dir: str | None = None
    local_files_only: bool = False
    language: str | None = "en"

    def __post_init__(self) -> None:
        if self.kind not in ASR_KINDS:
            raise ConfigError(f"asr.kind must be one of {ASR_KINDS}, got {self.kind!r}")
        if self.kind == "transformers" and not self.model:
            raise ConfigError("asr.kind 'transformers' needs asr.model (a Whisper or CTC checkpoint: hub name or folder)")
        if not isinstance(self.lm_order, int) or self.lm_order < 1:
            raise ConfigError(f"asr.lm_order must be a positive integer, got {self.lm_order!r}")


@dataclass
class AsrCascadeConfig:
    """Configuration of :class:`AsrCascade`: the trained text dual encoder and the recogniser in front of it."""

    text_model: str = ""
    asr: AsrConfig = field(default_factory=AsrConfig)

    def __post_init__(self) -> None:
        if isinstance(self.asr, dict):
            self.asr = AsrConfig(**self.asr)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("VGSKIT_CACHE") or Path.home() / ".cache" / "vgskit") / "transcripts"


class AsrCascade(RetrievalModel):
    """Speech → ASR → text tower ⟷ image tower (see the module docstring)."""

    config_class = AsrCascadeConfig
    trainable = False

    def __init__(self, config: AsrCascadeConfig | None = None):
        config = config or AsrCascadeConfig()
        super().__init__(config)
        self.config: AsrCascadeConfig = config
        if not config.text_model:
            raise ConfigError("asr_cascade: text_model is required — a trained text dual encoder (a run folder, "
                              "checkpoint folder or Hub id of a milan_text model; train one with "
                              "`vgskit train --recipe milan_text_scenes` or a milan_text_* recipe)")
        from vgskit.experiment import load_model

        text_model = load_model(config.text_model)
        if not callable(getattr(text_model, "encode_texts", None)):
            raise ConfigError(f"asr_cascade: text_model {config.text_model!r} is a "
                              f"{getattr(text_model, 'model_name', type(text_model).__name__)!r} model, which "
                              "does not embed text (train a milan_text model)")
        # The cascade trains nothing: its text model is used as trained (eval mode, no gradients).
        text_model.eval()
        for p in text_model.parameters():
            p.requires_grad_(False)
        self.text_model: nn.Module = text_model
        # Transcripts instead of audio for the ground-truth-text topline: the data pipeline then serves the
        # manifest's text (an instance attribute: what the model reads depends on its config).
        self.speech_input = "text" if config.asr.kind == "transcripts" else "waveform"  # type: ignore[misc]
        self._recognizer: Any = None
        self._cache: Any = None

    # ------------------------------------------------------------------ the contract

    @property
    def embed_dim(self) -> int:
        return int(self.text_model.embed_dim)

    @property
    def image_transform(self) -> dict[str, Any]:
        return dict(self.text_model.image_transform)

    def train(self, mode: bool = True) -> AsrCascade:
        super().train(mode)
        self.text_model.eval()  # never trained here: dropout stays off, BatchNorm keeps its statistics
        return self

    def embed_image(self, image: ImageInputs) -> Embeddings:
        return self.text_model.embed_image(image)

    def embed_speech(self, speech: SpeechInputs) -> Embeddings:
        if speech.kind == "text":
            return self.text_model.embed_speech(speech)
        if speech.kind != "waveform":
            raise ConfigError(f"asr_cascade reads waveforms (or transcripts), got {speech.kind}")
        return Embeddings(self.text_model.encode_texts(self.transcribe(speech)))

    def step(self, batch: Any, state: Any) -> Any:
        raise ConfigError("asr_cascade has nothing to train: train its text model (milan_text) instead")

    # ------------------------------------------------------------------ ASR

    @property
    def recognizer(self) -> Any:
        """The recogniser, built on first use (so building the model needs none of the ASR packages)."""
        if self._recognizer is None:
            self._recognizer = self._build_recognizer()
        return self._recognizer

    def _build_recognizer(self) -> Any:
        from vgskit.asr.recognizers import PocketSphinxRecognizer, TransformersRecognizer

        asr = self.config.asr
        if asr.kind == "transcripts":
            raise ConfigError("asr_cascade with asr.kind 'transcripts' reads the manifest's text; it has no recogniser")
        if asr.kind == "transformers":
            return TransformersRecognizer(str(asr.model), local_files_only=asr.local_files_only, language=asr.language)
        lm_texts = None
        if asr.language_model is None and asr.lm_manifest:
            from vgskit.data.manifest import read_manifest

            records = read_manifest(asr.lm_manifest, split=asr.lm_split, check_files=False)
            lm_texts = [r.text for r in records if r.text]
            if not lm_texts:
                raise ConfigError(f"asr.lm_manifest {asr.lm_manifest}: split {asr.lm_split!r} has no captions with "
                                  "text to build a language model from")
        work_dir = None if self.config.asr.cache_dir == "" else self._cache_dir() / "language_models"
        return PocketSphinxRecognizer(acoustic_model=asr.model, dictionary=asr.dictionary,
                                      language_model=asr.language_model, lm_texts=lm_texts, lm_order=asr.lm_order,
                                      work_dir=work_dir)

    def _cache_dir(self) -> Path:
        return Path(self.config.asr.cache_dir) if self.config.asr.cache_dir else _default_cache_dir()

    def transcribe(self, speech: SpeechInputs) -> list[str]:
        """Transcripts of a batch of waveforms (cached: see the module docstring)."""
        from vgskit.asr.recognizers import TranscriptCache, audio_sha256

        if speech.kind == "text":
            return speech.texts()
        if speech.kind != "waveform":
            raise ConfigError(f"asr_cascade transcribes waveforms, got {speech.kind}")
        if int(round(speech.rate)) != 16000:
            raise ConfigError(f"asr_cascade: waveforms must be 16 kHz, got {speech.rate:g} Hz")
        values = speech.values.detach().float().cpu().numpy()
        wavs = [values[i, : int(n)] for i, n in enumerate(speech.lengths.tolist())]
        if self._cache is None and self.config.asr.cache_dir != "":
            self._cache = TranscriptCache(self._cache_dir())
        shas = [audio_sha256(w) for w in wavs]
        identity = self.recognizer.identity
        texts: list[str | None] = [self._cache.get(identity, s) if self._cache else None for s in shas]
        todo = [i for i, t in enumerate(texts) if t is None]
        if todo:
            fresh = self.recognizer.transcribe([wavs[i] for i in todo])
            for i, text in zip(todo, fresh, strict=True):
                texts[i] = text
                if self._cache is not None:
                    self._cache.put(identity, shas[i], text)
        return [str(t) for t in texts]


register_model("asr_cascade")(AsrCascade)
