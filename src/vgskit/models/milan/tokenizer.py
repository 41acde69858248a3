"""Subword units for MILAN's text tower: byte-pair encoding learnt from the training captions.

The paper's text tower reads "per-word, contextualized BERT embeddings" (§4, after Table 6); BERT's weights are
not available offline, so the tower here learns its own subword embeddings. The units are byte-pair merges
(Sennrich, Haddow & Birch 2016) learnt on the words of the training captions, in
:func:`vgskit.asr.wer.normalize_transcript`'s normal form (lower case, no punctuation) — the form ASR output has,
so that transcripts and written captions meet the same vocabulary. A word is split into characters plus an
end-of-word marker and the merges are applied in the order they were learnt; characters never seen in training
map to the unknown unit. The merges are part of the model's config (saved with it), so a checkpoint tokenises
exactly as it was trained.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

from vgskit.asr.wer import normalize_transcript

__all__ = ["EOW", "PAD", "UNK", "BPETokenizer", "learn_bpe"]

PAD, UNK, EOW = "<pad>", "<unk>", "</w>"


def learn_bpe(texts: Iterable[str], num_merges: int, min_frequency: int = 2) -> tuple[list[str], list[str]]:
    """Characters and ``num_merges`` merges (``"a b"`` strings, in order) learnt from the words of ``texts``.

    Each round merges the most frequent adjacent pair (ties: the lexicographically smallest, so the result
    does not depend on dictionary order); stops early when no pair occurs ``min_frequency`` times.
    """
    words = Counter(w for t in texts for w in normalize_transcript(t))
    segmented = {w: [*w[:-1], w[-1] + EOW] if w else [] for w in words}
    chars = sorted({c for parts in segmented.values() for c in parts})
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[str]] = {}
    for w, parts in segmented.items():
        for pair in zip(parts, parts[1:], strict=False):
            pair_counts[pair] += words[w]
            where.setdefault(pair, set()).add(w)
    merges: list[str] = []
    while len(merges) < num_merges and pair_counts:
        best_count = max(pair_counts.values())
        if best_count < min_frequency:
            break
        best = min(p for p, c in pair_counts.items() if c == best_count)
        merges.append(f"{best[0]} {best[1]}")
        for w in sorted(where.pop(best, ())):
            parts = segmented[w]
            for pair in zip(parts, parts[1:], strict=False):  # remove this word's old pairs
                pair_counts[pair] -= words[w]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            segmented[w] = merged
            for pair in zip(merged, merged[1:], strict=False):
                pair_counts[pair] += words[w]
                where.setdefault(pair, set()).add(w)
        pair_counts.pop(best, None)
    return chars, merges


class BPETokenizer:
    """Text → subword ids with learnt merges. Ids: 0 padding, 1 unknown, then the characters, then one unit per
    merge (so ``vocab_size = 2 + len(chars) + len(merges)``)."""

    def __init__(self, chars: Sequence[str], merges: Sequence[str]):
        self.units = [PAD, UNK, *chars, *(m.replace(" ", "") for m in merges)]
        self.index = {u: i for i, u in enumerate(self.units)}  # later duplicates (none in practice) win
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self._word = lru_cache(maxsize=65536)(self._encode_word)

    @property
    def vocab_size(self) -> int:
        return len(self.units)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        parts = [*word[:-1], word[-1] + EOW]
        while len(parts) > 1:
            ranked = [(self.ranks.get((a, b), len(self.ranks)), i) for i, (a, b) in
                      enumerate(zip(parts, parts[1:], strict=False))]
            rank, i = min(ranked)
            if rank == len(self.ranks):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return tuple(self.index.get(p, 1) for p in parts)

    def encode(self, text: str) -> list[int]:
        """Subword ids of ``text`` (normalised; an empty text gives no ids)."""
        return [i for w in normalize_transcript(text) for i in self._word(w)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of subword ids (unknown units as ``<unk>``; padding dropped)."""
        return "".join(self.units[i] for i in ids if i != 0).replace(EOW, " ").strip()
