"""Word error rate: the edit distance between hypothesis and reference word sequences over the reference length.

``WER = (S + D + I) / N`` (substitutions, deletions, insertions of the Levenshtein alignment; ``N`` reference
words), summed over a corpus before dividing (a corpus WER, as ASR toolkits and ``jiwer`` report it: long
captions weigh more than short ones). Text is normalised first by :func:`normalize_transcript`: lower case,
punctuation other than in-word apostrophes removed, whitespace collapsed — what ASR output and written
captions differ in without any recognition error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WordErrors", "corpus_wer", "normalize_transcript", "word_errors"]

_DROP = re.compile(r"[^\w\s']+|(?<!\w)'|'(?!\w)")


def normalize_transcript(text: str) -> list[str]:
    """Lower-cased words of ``text`` without punctuation (``"A red dress, left."`` → ``["a", "red", "dress", "left"]``)."""
    return _DROP.sub(" ", text.lower()).split()


@dataclass(frozen=True)
class WordErrors:
    """Edit operations of one alignment (or a sum of them) and the reference length."""

    substitutions: int
    deletions: int
    insertions: int
    reference_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Errors per reference word (``inf`` for errors against an empty reference, 0 for none)."""
        if self.reference_words == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return self.errors / self.reference_words

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(self.substitutions + other.substitutions, self.deletions + other.deletions,
                          self.insertions + other.insertions, self.reference_words + other.reference_words)


def word_errors(reference: Sequence[str] | str, hypothesis: Sequence[str] | str) -> WordErrors:
    """Minimum-edit alignment counts of ``hypothesis`` against ``reference`` (strings are normalised first).

    Among alignments with the fewest errors, substitutions are preferred over a deletion + insertion pair
    (the usual convention; the total is the same either way).
    """
    ref = normalize_transcript(reference) if isinstance(reference, str) else list(reference)
    hyp = normalize_transcript(hypothesis) if isinstance(hypothesis, str) else list(hypothesis)
    # cost[j] = (errors, subs, dels, ins) aligning ref[:i] with hyp[:j]; tuples compare errors first.
    prev = [(j, 0, 0, j) for j in range(len(hyp) + 1)]
    for i in range(1, len(ref) + 1):
        cur = [(i, 0, i, 0)]
        for j in range(1, len(hyp) + 1):
            e, s, d, n = prev[j - 1]
            same = ref[i - 1] == hyp[j - 1]
            diagonal = (e + (0 if same else 1), s + (0 if same else 1), d, n)
            e, s, d, n = prev[j]
            deletion = (e + 1, s, d + 1, n)
            e, s, d, n = cur[j - 1]
            insertion = (e + 1, s, d, n + 1)
            cur.append(min(diagonal, deletion, insertion, key=lambda c: (c[0], -c[1])))
        prev = cur
    _, s, d, n = prev[-1]
    return WordErrors(s, d, n, len(ref))


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> WordErrors:
    """Summed :func:`word_errors` over pairs (``.wer`` is the corpus WER)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"corpus_wer: {len(references)} references but {len(hypotheses)} hypotheses")
    total = WordErrors(0, 0, 0, 0)
    for ref, hyp in zip(references, hypotheses, strict=True):
        total = total + word_errors(ref, hyp)
    return total
