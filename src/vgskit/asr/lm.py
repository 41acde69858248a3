"""A word n-gram language model in ARPA format, estimated from captions (the ASR's "domain" language model).

A generic English language model knows little of what captions of a corpus say; a small n-gram model of the
training captions tells the recogniser which words and word orders to expect (on spoken-scenes speech the word
error of pocketsphinx falls from 0.85 to about 0.3 for espeak-ng voices with such a model; see the README).

Estimation: absolute discounting with back-off (Ney, Essen & Kneser 1994, in the Katz back-off form the ARPA
format stores). For each order ``n`` and seen history ``h``::

    p(w | h) = (c(h, w) − D_n) / c(h)                    for (h, w) seen
    p(w | h) = α(h) · p(w | h')                          otherwise (h' = h without its first word)
    α(h) = (1 − Σ_{w seen} p(w | h)) / (1 − Σ_{w seen} p(w | h'))

with ``D_n = n1 / (n1 + 2 n2)`` from the counts of n-grams seen once and twice (Ney's estimate, kept within
[0.1, 0.9]). Unigrams are maximum-likelihood estimates over the vocabulary (every word of it was seen);
``<s>`` gets log-probability −99 as ARPA files conventionally give the start symbol. Words are
:func:`vgskit.asr.wer.normalize_transcript`'s; ``vocabulary`` (e.g. a pronunciation dictionary's words) drops
sentences' out-of-vocabulary words before counting (a recogniser cannot emit a word it cannot pronounce).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from vgskit.asr.wer import normalize_transcript
from vgskit.errors import ConfigError

__all__ = ["NgramModel", "estimate_ngram_model"]

BOS, EOS = "<s>", "</s>"


@dataclass
class NgramModel:
    """An estimated back-off n-gram model.

    Attributes:
        order: highest n-gram order.
        logprob: n-gram tuple → log10 probability (every order).
        backoff: history tuple → log10 back-off weight (orders below ``order``; absent = 0).
        dropped_words: out-of-vocabulary word tokens removed before counting.
        total_words: word tokens read (before dropping).
    """

    order: int
    logprob: dict[tuple[str, ...], float]
    backoff: dict[tuple[str, ...], float]
    dropped_words: int = 0
    total_words: int = 0

    def prob(self, word: str, history: tuple[str, ...] = ()) -> float:
        """The back-off probability ``p(word | history)`` the ARPA file defines (not log)."""
        history = tuple(history)[-(self.order - 1):] if self.order > 1 else ()
        weight = 0.0
        while True:
            gram = (*history, word)
            if gram in self.logprob:
                return 10.0 ** (weight + self.logprob[gram])
            if not history:
                return 0.0
            weight += self.backoff.get(history, 0.0)
            history = history[1:]

    def to_arpa(self) -> str:
        """The model as ARPA text (``\\data\\`` header, one section per order, ``\\end\\``)."""
        by_order: dict[int, list[tuple[str, ...]]] = defaultdict(list)
        for gram in self.logprob:
            by_order[len(gram)].append(gram)
        lines = ["", "\\data\\"]
        lines += [f"ngram {n}={len(by_order[n])}" for n in range(1, self.order + 1)]
        for n in range(1, self.order + 1):
            lines += ["", f"\\{n}-grams:"]
            for gram in sorted(by_order[n]):
                entry = f"{self.logprob[gram]:.6f}\t{' '.join(gram)}"
                if n < self.order:
                    entry += f"\t{self.backoff.get(gram, 0.0):.6f}"
                lines.append(entry)
        lines += ["", "\\end\\", ""]
        return "\n".join(lines)


def _discount(counts: Counter) -> float:
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    d = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5
    return min(max(d, 0.1), 0.9)


def estimate_ngram_model(texts: Iterable[str], order: int = 3,
                         vocabulary: Collection[str] | None = None) -> NgramModel:
    """Estimate an ``order``-gram model of ``texts`` (see the module docstring).

    Raises:
        ConfigError: ``order`` < 1, or no in-vocabulary word in ``texts``.
    """
    if order < 1:
        raise ConfigError(f"estimate_ngram_model: order must be >= 1, got {order}")
    counts: list[Counter] = [Counter() for _ in range(order + 1)]  # counts[n][gram]
    dropped = total = 0
    for text in texts:
        words = normalize_transcript(text)
        total += len(words)
        if vocabulary is not None:
            kept = [w for w in words if w in vocabulary]
            dropped += len(words) - len(kept)
            words = kept
        if not words:
            continue
        sentence = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(sentence) - n + 1):
                gram = tuple(sentence[i:i + n])
                if gram == (BOS,):
                    continue
                counts[n][gram] += 1
    if not counts[1]:
        raise ConfigError("estimate_ngram_model: no (in-vocabulary) words in the texts")
    model = NgramModel(order=order, logprob={}, backoff={}, dropped_words=dropped, total_words=total)
    unigram_total = sum(counts[1].values())
    for gram, c in counts[1].items():
        model.logprob[gram] = math.log10(c / unigram_total)
    model.logprob[(BOS,)] = -99.0
    for n in range(2, order + 1):
        d = _discount(counts[n])
        history_total: Counter = Counter()
        followers: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for gram, c in counts[n].items():
            history_total[gram[:-1]] += c
            followers[gram[:-1]].append(gram[-1])
        for gram, c in counts[n].items():
            model.logprob[gram] = math.log10((c - d) / history_total[gram[:-1]])
        for history, words in followers.items():
            seen = sum(10.0 ** model.logprob[(*history, w)] for w in words)
            # The lower order's mass on the same words, through its own back-off (p(w | h')).
            lower = sum(model.prob(w, history[1:]) for w in words)
            numerator, denominator = max(1.0 - seen, 1e-12), max(1.0 - lower, 1e-12)
            model.backoff[history] = math.log10(numerator / denominator)
    return model
