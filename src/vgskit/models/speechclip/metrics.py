"""The keyword hit rate of cascaded SpeechCLIP: do the subwords a keyword slot picks occur in the caption?

Only the cascaded branch has keyword slots, so the metric lives with the family; the retrieval metrics every
model shares are in :mod:`vgskit.metrics`. :func:`vgskit.models.speechclip.evaluations.evaluate_keyword_hit_rate`
runs it over a dataset (``vgskit eval --keyword-hit-rate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["keyword_hit_rate"]


def keyword_hit_rate(keywords: Tensor, vocabulary: Tensor, caption_tokens: Sequence[Iterable[int]],
                     vocab_token_ids: Tensor | None = None, top: int = 5, chunk_size: int = 256) -> Tensor:
    """Per-slot keyword hit rate (percent) of a cascaded SpeechCLIP-style model.

    For every caption and keyword slot, the ``top`` vocabulary entries nearest to the slot's keyword embedding
    by cosine similarity are found; the slot *hits* when any of them is one of the caption's own subword ids.

    Args:
        keywords: ``[N, K, D]`` keyword embeddings (N captions, K slots).
        vocabulary: ``[V, D]`` token embeddings of the (reduced) vocabulary.
        caption_tokens: for each caption, its subword token ids (any iterable of ints).
        vocab_token_ids: ``[V]`` token id of each vocabulary row (default: the row index).
        top: how many nearest entries count.
        chunk_size: captions per similarity block (bounds memory at ``chunk_size * K * V``).

    Returns:
        ``[K]`` float64 hit rate per slot, in percent.
    """
    if keywords.ndim != 3 or vocabulary.ndim != 2 or keywords.shape[2] != vocabulary.shape[1]:
        raise ValueError(f"keywords [N,K,D] and vocabulary [V,D] expected, got {tuple(keywords.shape)} and "
                         f"{tuple(vocabulary.shape)}")
    n, k, _ = keywords.shape
    if len(caption_tokens) != n:
        raise ValueError(f"{len(caption_tokens)} token sets for {n} captions")
    if not 1 <= top <= vocabulary.shape[0]:
        raise ValueError(f"top must be in [1, {vocabulary.shape[0]}], got {top}")
    ids = torch.arange(vocabulary.shape[0]) if vocab_token_ids is None else vocab_token_ids.long().cpu()
    vocab = torch.nn.functional.normalize(vocabulary.float(), dim=-1)  # [V, D]
    hits = torch.zeros(k, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        block = torch.nn.functional.normalize(keywords[start:start + chunk_size].float(), dim=-1)  # [b, K, D]
        nearest = ids[(block @ vocab.T).topk(top, dim=-1).indices.cpu()]  # [b, K, top] token ids
        for row, tokens in enumerate(caption_tokens[start:start + chunk_size]):
            own = torch.tensor(sorted(set(int(t) for t in tokens)), dtype=torch.long)
            hits += torch.isin(nearest[row], own).any(dim=-1).double()  # [K]
    return 100.0 * hits / max(n, 1)
