"""Speech recognition for the speech → ASR → text cascade: recognisers, a caption language model, word error rate.

See :mod:`vgskit.asr.recognizers` (PocketSphinx, transformers Whisper / CTC, the transcript cache),
:mod:`vgskit.asr.lm` (an n-gram language model of captions in ARPA format) and :mod:`vgskit.asr.wer`.
"""

from vgskit.asr.lm import NgramModel, estimate_ngram_model
from vgskit.asr.wer import WordErrors, corpus_wer, normalize_transcript, word_errors

__all__ = ["NgramModel", "WordErrors", "corpus_wer", "estimate_ngram_model", "normalize_transcript", "word_errors"]
