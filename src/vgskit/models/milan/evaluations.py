"""The cascade's own evaluation: the word error rate of its recogniser, reported beside the recall.

``asr_wer`` (``vgskit eval --model asr_cascade ... --asr-wer``) transcribes every caption of the evaluated split
(the transcript cache makes this free after the recall pass) and scores the transcripts against the manifest's
``text`` with :func:`vgskit.asr.wer.corpus_wer`: the corpus WER with its substitutions, deletions and
insertions, and a few examples. The paper's Table 5 reads the cascade's recall in the light of its ASR quality
(Localized Narratives' Indian-English speech, recognised worse, halves the cascade's R@1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vgskit.errors import ConfigError
from vgskit.extensions import register_evaluation

__all__ = ["asr_wer_evaluation", "format_asr_wer", "require_recognizer"]


def require_recognizer(model: Any) -> None:
    """A clear error for a model without a recogniser (``transcribe`` over waveforms)."""
    name = getattr(model, "model_name", None) or type(model).__name__
    if not callable(getattr(model, "transcribe", None)):
        raise ConfigError(f"--asr-wer: model {name!r} does not transcribe speech (an asr_cascade model does)")
    if getattr(model, "speech_input", "waveform") == "text":
        raise ConfigError(f"--asr-wer: model {name!r} reads the manifest's transcripts (asr.kind 'transcripts'); "
                          "they are the references, so there is no recognition error to measure")


def require_transcripts(dataset: Any, source: str) -> None:
    missing = [r.caption_id for r in dataset.records if not r.text]
    if missing:
        raise ConfigError(f"--asr-wer: {len(missing)} of {len(dataset.records)} captions of {source} have no 'text' "
                          f"to score transcripts against (first: {', '.join(missing[:3])})")


def format_asr_wer(result: Mapping[str, Any]) -> str:
    return (f"ASR word error rate: {100 * result['wer']:.1f} % over {result['reference_words']} words of "
            f"{result['captions']} captions (substitutions {result['substitutions']}, deletions "
            f"{result['deletions']}, insertions {result['insertions']}; recogniser {result['recognizer']})")


@register_evaluation("asr_wer", require_model=require_recognizer, require_data=require_transcripts,
                     format=format_asr_wer, help="word error rate of the cascade's recogniser on the captions' text")
def asr_wer_evaluation(model: Any, dataset: Any, *, batch_size: int, source: str, options: Mapping[str, Any],
                       speech_emb: Any) -> dict[str, Any]:
    """Corpus WER of ``model.transcribe`` on every caption of ``dataset`` (see the module docstring)."""
    from vgskit.asr.wer import corpus_wer, word_errors
    from vgskit.retrieval.evaluate import map_speech

    hypotheses = map_speech(model, dataset, model.transcribe, batch_size=batch_size)
    references = [str(r.text) for r in dataset.records]
    total = corpus_wer(references, hypotheses)
    worst = sorted(range(len(references)), key=lambda i: -word_errors(references[i], hypotheses[i]).errors)[:3]
    return {"wer": total.wer, "substitutions": total.substitutions, "deletions": total.deletions,
            "insertions": total.insertions, "reference_words": total.reference_words, "captions": len(references),
            "recognizer": model.recognizer.identity,
            "examples": [{"caption_id": dataset.records[i].caption_id, "reference": references[i],
                          "transcript": hypotheses[i]} for i in worst]}
